//! The register state a boot protocol asks for at the kernel's entry point.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{CODE32_SEL, CODE64_SEL, DATA_SEL, TSS_SEL, boot_gdt, boot_segment};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 2;

/// How the bootstrap processor enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Long64 { rip: u64, zero_page: u64, cr3: u64 },
    /// PVH and Multiboot: 32-bit protected mode, paging off, EAX/EBX per protocol.
    Protected32 { rip: u64, eax: u32, ebx: u32 },
}

/// Writes the GDT and an empty IDT the entry state refers to.
pub fn write_descriptor_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<(), vm_memory::GuestMemoryError> {
    let gdt: Vec<u8> = boot_gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

pub fn regs(entry: Entry) -> kvm_regs {
    match entry {
        Entry::Long64 { rip, zero_page, .. } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: zero_page,
            ..Default::default()
        },
        Entry::Protected32 { rip, eax, ebx } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip,
            rax: u64::from(eax),
            rbx: u64::from(ebx),
            ..Default::default()
        },
    }
}

/// `base` is the vCPU's current sregs (it carries the APIC base and other state to keep).
pub fn sregs(entry: Entry, base: &kvm_sregs) -> kvm_sregs {
    let mut s = *base;
    let data = boot_segment(DATA_SEL);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = boot_segment(TSS_SEL);
    s.gdt.base = BOOT_GDT_START;
    s.gdt.limit = (boot_gdt().len() * 8 - 1) as u16;
    s.idt.base = BOOT_IDT_START;
    s.idt.limit = 7;
    match entry {
        Entry::Long64 { cr3, .. } => {
            s.cs = boot_segment(CODE64_SEL);
            s.cr0 = CR0_PE | CR0_ET | CR0_PG;
            s.cr3 = cr3;
            s.cr4 = CR4_PAE;
            s.efer = EFER_LME | EFER_LMA;
        }
        Entry::Protected32 { .. } => {
            s.cs = boot_segment(CODE32_SEL);
            s.cr0 = CR0_PE | CR0_ET;
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
    }
    s
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_entry() {
        let e = Entry::Long64 {
            rip: 0x100200,
            zero_page: 0x7000,
            cr3: 0x9000,
        };
        let r = regs(e);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100200, 0x7000, 2));
        let s = sregs(e, &kvm_sregs::default());
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ds.selector, 0x18);
        assert_eq!(s.cs.l, 1);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, 0x9000);
    }

    #[test]
    fn protected_mode_entry() {
        let e = Entry::Protected32 {
            rip: 0x1000c0,
            eax: 0x2bad_b002,
            ebx: 0x1000,
        };
        let r = regs(e);
        assert_eq!((r.rax, r.rbx), (0x2bad_b002, 0x1000));
        let base = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let s = sregs(e, &base);
        assert_eq!((s.cr0, s.cr4, s.efer), (CR0_PE | CR0_ET, 0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.limit), (1, 0, 0xffff_ffff));
        assert_eq!(s.apic_base, 0xfee0_0900, "kept from the vCPU");
    }
}
