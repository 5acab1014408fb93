//! CPU templates: CPUID features hidden from the guest, by name.
//!
//! Hiding features lets a VM migrate to a host that lacks them and lets guests avoid instructions
//! a host's KVM cannot run (on PVM hosts, `cx16` and `xsave`).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Where a feature bit lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> FeatureBit {
    FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Names as Linux's /proc/cpuinfo spells them.
const FEATURES: &[(&str, FeatureBit)] = &[
    ("sse3", f(1, 0, Reg::Ecx, 0)),
    ("pclmulqdq", f(1, 0, Reg::Ecx, 1)),
    ("monitor", f(1, 0, Reg::Ecx, 3)),
    ("vmx", f(1, 0, Reg::Ecx, 5)),
    ("ssse3", f(1, 0, Reg::Ecx, 9)),
    ("fma", f(1, 0, Reg::Ecx, 12)),
    ("cx16", f(1, 0, Reg::Ecx, 13)),
    ("pdcm", f(1, 0, Reg::Ecx, 15)),
    ("pcid", f(1, 0, Reg::Ecx, 17)),
    ("sse4_1", f(1, 0, Reg::Ecx, 19)),
    ("sse4_2", f(1, 0, Reg::Ecx, 20)),
    ("x2apic", f(1, 0, Reg::Ecx, 21)),
    ("movbe", f(1, 0, Reg::Ecx, 22)),
    ("popcnt", f(1, 0, Reg::Ecx, 23)),
    ("tsc_deadline_timer", f(1, 0, Reg::Ecx, 24)),
    ("aes", f(1, 0, Reg::Ecx, 25)),
    ("xsave", f(1, 0, Reg::Ecx, 26)),
    ("avx", f(1, 0, Reg::Ecx, 28)),
    ("f16c", f(1, 0, Reg::Ecx, 29)),
    ("rdrand", f(1, 0, Reg::Ecx, 30)),
    ("mce", f(1, 0, Reg::Edx, 7)),
    ("mtrr", f(1, 0, Reg::Edx, 12)),
    ("fsgsbase", f(7, 0, Reg::Ebx, 0)),
    ("bmi1", f(7, 0, Reg::Ebx, 3)),
    ("hle", f(7, 0, Reg::Ebx, 4)),
    ("avx2", f(7, 0, Reg::Ebx, 5)),
    ("smep", f(7, 0, Reg::Ebx, 7)),
    ("bmi2", f(7, 0, Reg::Ebx, 8)),
    ("erms", f(7, 0, Reg::Ebx, 9)),
    ("invpcid", f(7, 0, Reg::Ebx, 10)),
    ("rtm", f(7, 0, Reg::Ebx, 11)),
    ("avx512f", f(7, 0, Reg::Ebx, 16)),
    ("rdseed", f(7, 0, Reg::Ebx, 18)),
    ("adx", f(7, 0, Reg::Ebx, 19)),
    ("smap", f(7, 0, Reg::Ebx, 20)),
    ("clflushopt", f(7, 0, Reg::Ebx, 23)),
    ("clwb", f(7, 0, Reg::Ebx, 24)),
    ("sha_ni", f(7, 0, Reg::Ebx, 29)),
    ("umip", f(7, 0, Reg::Ecx, 2)),
    ("pku", f(7, 0, Reg::Ecx, 3)),
    ("la57", f(7, 0, Reg::Ecx, 16)),
    ("rdpid", f(7, 0, Reg::Ecx, 22)),
    ("lahf_lm", f(0x8000_0001, 0, Reg::Ecx, 0)),
    ("abm", f(0x8000_0001, 0, Reg::Ecx, 5)),
    ("sse4a", f(0x8000_0001, 0, Reg::Ecx, 6)),
    ("pdpe1gb", f(0x8000_0001, 0, Reg::Edx, 26)),
    ("rdtscp", f(0x8000_0001, 0, Reg::Edx, 27)),
];

/// Hiding a feature hides what is built on it.
const IMPLIES: &[(&str, &[&str])] = &[
    ("xsave", &["avx"]),
    ("avx", &["avx2", "fma", "f16c", "avx512f"]),
];

/// What PVM hosts' instruction emulator cannot run in a guest kernel: `lock cmpxchg16b` (SLUB),
/// `xrstor` (FPU set-up), 5-level paging, and SSSE3 (Linux's BLAKE2s for its random pool runs
/// SSSE3 code in the kernel; PVM's emulator has no SSE arithmetic).
pub const PVM_HIDDEN: &[&str] = &["cx16", "xsave", "la57", "ssse3"];

/// Features PVM's KVM shows the guest whatever its CPUID says (measured with Debian's 6.1
/// kernel: CX16 hidden by CPUID, XSAVE, AVX, POPCNT, SMAP and FSGSBASE still used), with the
/// Linux command-line word that hides each from a Linux guest instead.
const PVM_CPUID_IGNORED: &[(&str, &str)] = &[("xsave", "noxsave"), ("ssse3", "clearcpuid=ssse3")];

/// XSAVE state enumeration, emptied when `xsave` is hidden.
pub const XSAVE_LEAF: u32 = 0xd;
/// OSXSAVE mirrors CR4.OSXSAVE; it must go with XSAVE.
const OSXSAVE: FeatureBit = f(1, 0, Reg::Ecx, 27);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown CPU feature '{0}' (known: {known})", known = known_names())]
    Unknown(String),
    #[error("'{0}': features can only be hidden, write '-{1}'")]
    NotHide(String, String),
}

fn known_names() -> String {
    FEATURES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A set of features to hide, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    hidden: Vec<&'static str>,
}

impl CpuTemplate {
    /// Parses `-cx16,-xsave` (also accepts `:` as separator); `none` hides nothing.
    pub fn parse(spec: &str) -> Result<Self, TemplateError> {
        let mut t = Self::default();
        if spec.trim().eq_ignore_ascii_case("none") {
            return Ok(t);
        }
        for item in spec
            .split([',', ':'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let name = item.strip_prefix('-').ok_or_else(|| {
                TemplateError::NotHide(item.into(), item.trim_start_matches('+').into())
            })?;
            t.hide(name)?;
        }
        Ok(t)
    }

    pub fn hide(&mut self, name: &str) -> Result<(), TemplateError> {
        let lower = name.to_ascii_lowercase();
        let (canonical, _) = FEATURES
            .iter()
            .find(|(n, _)| *n == lower)
            .ok_or_else(|| TemplateError::Unknown(name.into()))?;
        if !self.hidden.contains(canonical) {
            self.hidden.push(canonical);
            for (_, implied) in IMPLIES.iter().filter(|(n, _)| n == canonical) {
                for i in *implied {
                    self.hide(i)?;
                }
            }
        }
        Ok(())
    }

    /// The template a host gets when none is given: PVM hosts hide what their emulator cannot
    /// run; hardware KVM hides nothing.
    pub fn host_default(pvm: bool) -> Self {
        let mut t = Self::default();
        if pvm {
            for name in PVM_HIDDEN {
                t.hide(name).expect("PVM_HIDDEN names known features");
            }
        }
        t
    }

    /// Kernel command-line words a Linux guest needs for this template where CPUID alone does
    /// not do (on PVM hosts, see `PVM_CPUID_IGNORED`).
    pub fn linux_cmdline_words(&self, pvm: bool) -> Vec<&'static str> {
        if !pvm {
            return Vec::new();
        }
        PVM_CPUID_IGNORED
            .iter()
            .filter(|(feature, _)| self.hides(feature))
            .map(|(_, word)| *word)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.hidden.is_empty()
    }

    pub fn hides(&self, name: &str) -> bool {
        self.hidden.contains(&name)
    }

    /// Bits to clear, including those implied.
    pub fn bits(&self) -> Vec<FeatureBit> {
        let mut bits: Vec<FeatureBit> = self
            .hidden
            .iter()
            .filter_map(|h| FEATURES.iter().find(|(n, _)| n == h).map(|(_, b)| *b))
            .collect();
        if self.hides("xsave") {
            bits.push(OSXSAVE);
        }
        bits
    }
}

/// Written as `parse` reads it: `-cx16,-xsave`, or `none`.
impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hidden.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<String> = self.hidden.iter().map(|n| format!("-{n}")).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_expands_dependencies() {
        let t = CpuTemplate::parse("-cx16,-XSAVE").unwrap();
        assert!(t.hides("cx16") && t.hides("xsave") && t.hides("avx") && t.hides("avx2"));
        let bits = t.bits();
        assert!(bits.contains(&f(1, 0, Reg::Ecx, 13)));
        assert!(bits.contains(&OSXSAVE));
        assert_eq!(t.to_string(), "-cx16,-xsave,-avx,-avx2,-fma,-f16c,-avx512f");
        assert_eq!(CpuTemplate::parse("-cx16:-cx16").unwrap().bits().len(), 1);
        assert!(CpuTemplate::parse("").unwrap().is_empty());
        assert!(CpuTemplate::parse(" None ").unwrap().is_empty());
        assert_eq!(CpuTemplate::default().to_string(), "none");
    }

    #[test]
    fn host_defaults() {
        assert!(CpuTemplate::host_default(false).is_empty());
        let pvm = CpuTemplate::host_default(true);
        assert!(pvm.hides("cx16") && pvm.hides("xsave") && pvm.hides("la57"));
        assert!(pvm.hides("avx"), "with what depends on xsave");
        assert_eq!(
            pvm.linux_cmdline_words(true),
            ["noxsave", "clearcpuid=ssse3"]
        );
        assert!(pvm.linux_cmdline_words(false).is_empty());
        assert!(
            CpuTemplate::parse("-cx16")
                .unwrap()
                .linux_cmdline_words(true)
                .is_empty()
        );
    }

    #[test]
    fn rejects_unknown_and_additions() {
        assert!(matches!(
            CpuTemplate::parse("-warp9"),
            Err(TemplateError::Unknown(n)) if n == "warp9"
        ));
        assert!(matches!(
            CpuTemplate::parse("+avx"),
            Err(TemplateError::NotHide(..))
        ));
        assert!(matches!(
            CpuTemplate::parse("avx"),
            Err(TemplateError::NotHide(..))
        ));
    }
}
