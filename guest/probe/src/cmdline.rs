//! Kernel command line: `probe=a,b,c`, `probe.end=<action>`, and numeric options such as
//! `bench.ms=N` that single checks look up with [`number`].

use crate::end::EndAction;

/// Largest command line read (the VMM's cmdline area is 0x20000..0x30000).
const MAX_LEN: usize = 0x10000;

/// Default check list when no `probe=` is given.
pub const DEFAULT_CHECKS: &str = "cpus,mem,acpi";

/// Returns the NUL-terminated command line at `paddr` (empty if 0 or not UTF-8). Runs in
/// ring 3 at start-up (`main.rs`), so scanning it byte by byte costs nothing emulated.
///
/// # Safety
/// `paddr` must be 0 or point to identity-mapped memory holding a NUL-terminated string.
pub unsafe fn read(paddr: u64) -> &'static str {
    if paddr == 0 {
        return "";
    }
    let base = paddr as *const u8;
    let mut len = 0;
    // SAFETY: caller guarantees the string is readable up to its NUL (bounded by MAX_LEN).
    while len < MAX_LEN && unsafe { *base.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just scanned are readable and stay unchanged for the run.
    let bytes = unsafe { core::slice::from_raw_parts(base, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// What the command line asks for.
pub struct Options<'a> {
    /// Check names, in order.
    pub checks: &'a str,
    pub end: EndAction,
    /// A `probe.end=` value that could not be parsed.
    pub bad_end: Option<&'a str>,
}

impl<'a> Options<'a> {
    pub fn parse(cmdline: &'a str) -> Self {
        let mut opts = Options {
            checks: DEFAULT_CHECKS,
            end: EndAction::Poweroff,
            bad_end: None,
        };
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("probe=") {
                opts.checks = v;
            } else if let Some(v) = word.strip_prefix("probe.end=") {
                match EndAction::parse(v) {
                    Some(a) => opts.end = a,
                    None => opts.bad_end = Some(v),
                }
            }
        }
        opts
    }

    /// The selected check names (empty items skipped).
    pub fn check_names(&self) -> impl Iterator<Item = &'a str> {
        self.checks.split(',').filter(|s| !s.is_empty())
    }
}

/// The value of the last `key=<decimal>` word of `cmdline`: `Ok(None)` if absent, `Err` (the
/// check's FAIL text) if present but not a number.
pub fn number(cmdline: &str, key: &str) -> Result<Option<u64>, alloc::string::String> {
    let mut found = None;
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            found = Some(v);
        }
    }
    match found {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| alloc::format!("{key}={v} is not a number")),
    }
}

/// [`number`] with a default and an accepted range.
pub fn number_in(
    cmdline: &str,
    key: &str,
    default: u64,
    range: core::ops::RangeInclusive<u64>,
) -> Result<u64, alloc::string::String> {
    let v = number(cmdline, key)?.unwrap_or(default);
    if range.contains(&v) {
        Ok(v)
    } else {
        Err(alloc::format!(
            "{key}={v} is outside {}..={}",
            range.start(),
            range.end()
        ))
    }
}
