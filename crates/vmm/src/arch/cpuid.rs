//! Per-vCPU CPUID: what KVM supports, with this vCPU's APIC id and the VM's topology (one
//! socket, one thread per core), the hypervisor leaves, the TSC frequency, and the template.

use kvm_bindings::kvm_cpuid_entry2;

use super::cpu_template::{CpuTemplate, Reg, XSAVE_LEAF};

const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
/// Hypervisor timing leaf (VMware convention Linux reads): EAX = TSC kHz, EBX = APIC bus kHz.
pub const TSC_LEAF: u32 = 0x4000_0010;
const KVM_BASE_LEAF: u32 = 0x4000_0000;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// What the filter needs to know about the VM and this vCPU.
#[derive(Debug, Clone)]
pub struct CpuidParams<'a> {
    pub vcpu_id: u32,
    pub vcpu_count: u32,
    pub tsc_khz: Option<u32>,
    pub template: &'a CpuTemplate,
}

fn reg(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Bits needed to number `n` things.
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (KVM_GET_SUPPORTED_CPUID's) for one vCPU; may append the TSC leaf.
pub fn filter(entries: &mut Vec<kvm_cpuid_entry2>, p: &CpuidParams) {
    let core_bits = width(p.vcpu_count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8] CLFLUSH.
                e.ebx = (p.vcpu_id << 24) | ((p.vcpu_count.min(255)) << 16) | (8 << 8);
                e.ecx |= HYPERVISOR_BIT;
                if p.vcpu_count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 => {
                // Cache leaves: [31:26] cores per package - 1, [25:14] threads sharing - 1
                // (the last level is shared by the whole package, the others per core).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { p.vcpu_count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff)
                    | ((p.vcpu_count - 1).min(63) << 26)
                    | (sharing.min(0xfff) << 14);
            }
            6 => {
                // No thermal/power management to expose.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                // No virtual PMU: a guest probing counters would otherwise fault on PVM hosts.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 = SMT (1 thread), level 1 = core.
                let (shift, count, kind) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_bits, p.vcpu_count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (kind << 8) | e.index;
                e.edx = p.vcpu_id;
            }
            KVM_BASE_LEAF if p.tsc_khz.is_some() => e.eax = e.eax.max(TSC_LEAF),
            _ => {}
        }
    }
    if let Some(khz) = p.tsc_khz {
        entries.retain(|e| e.function != TSC_LEAF);
        if entries.iter().any(|e| e.function == KVM_BASE_LEAF) {
            entries.push(kvm_cpuid_entry2 {
                function: TSC_LEAF,
                eax: khz,
                ebx: APIC_BUS_KHZ,
                ..Default::default()
            });
        }
    }
    apply_template(entries, p.template);
}

fn apply_template(entries: &mut [kvm_cpuid_entry2], t: &CpuTemplate) {
    for bit in t.bits() {
        for e in entries.iter_mut().filter(|e| {
            e.function == bit.leaf
                && (e.index == bit.subleaf || e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        }) {
            *reg(e, bit.reg) &= !(1u32 << bit.bit);
        }
    }
    if t.hides("xsave") {
        for e in entries.iter_mut().filter(|e| e.function == XSAVE_LEAF) {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                1
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(1, 0, [0x906ea, 0xff0800, 0xfffa3223, 0x1789fbff]),
            leaf(4, 0, [0x1c004121, 0, 0, 0]),
            leaf(4, 3, [0x1c03c163, 0, 0, 0]),
            leaf(7, 0, [0, 0x29c6fbf, 0, 0]),
            leaf(0xb, 0, [1, 1, 0x100, 0]),
            leaf(0xb, 1, [4, 4, 0x201, 0]),
            leaf(0xd, 0, [7, 0x340, 0x340, 0]),
            leaf(0xd, 1, [1, 0, 0, 0]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d]),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let t = CpuTemplate::default();
        let mut v = host();
        filter(
            &mut v,
            &CpuidParams {
                vcpu_id: 5,
                vcpu_count: 6,
                tsc_khz: None,
                template: &t,
            },
        );
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 6);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        let smt = find(&v, 0xb, 0);
        let core = find(&v, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.edx), (0, 1, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!(find(&v, 4, 0).eax >> 26, 5);
        assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0, "L1 per core");
        assert_eq!((find(&v, 4, 3).eax >> 14) & 0xfff, 5, "L3 shared");
        assert!(v.iter().all(|e| e.function != TSC_LEAF));
    }

    #[test]
    fn single_vcpu_has_no_htt_and_gets_tsc_leaf() {
        let t = CpuTemplate::default();
        let mut v = host();
        filter(
            &mut v,
            &CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_khz: Some(2_100_000),
                template: &t,
            },
        );
        assert_eq!(find(&v, 1, 0).edx & HTT_BIT, 0);
        let tsc = find(&v, TSC_LEAF, 0);
        assert_eq!((tsc.eax, tsc.ebx), (2_100_000, 1_000_000));
        assert_eq!(find(&v, 0x4000_0000, 0).eax, TSC_LEAF);
    }

    #[test]
    fn template_clears_bits_and_xsave_state() {
        let t = CpuTemplate::parse("-cx16,-xsave").unwrap();
        let mut v = host();
        filter(
            &mut v,
            &CpuidParams {
                vcpu_id: 0,
                vcpu_count: 2,
                tsc_khz: None,
                template: &t,
            },
        );
        let l1 = find(&v, 1, 0);
        for bit in [13, 26, 27, 28, 12, 29] {
            assert_eq!(l1.ecx & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(l1.ecx & 1, 0, "sse3 kept");
        assert_eq!(find(&v, 7, 0).ebx & (1 << 5), 0, "avx2 follows avx");
        assert_eq!(find(&v, 0xd, 0).eax, 0);
        assert_eq!(find(&v, 0xd, 1).eax, 0);
    }
}
