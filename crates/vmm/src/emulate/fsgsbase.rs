//! `rdfsbase`, `rdgsbase`, `wrfsbase`, `wrgsbase` (32- and 64-bit forms): read or write the FS
//! or GS base without an MSR access. #UD outside 64-bit mode or without CR4.FSGSBASE; writing a
//! non-canonical base raises #GP(0).

use iced_x86::{Code, Instruction};
use kvm_bindings::kvm_regs;

use super::operands::{OperandError, general_protection, register, set_register};
use super::{Completion, CpuState, Exception, Kind, UD_VECTOR};

const CR4_FSGSBASE: u64 = 1 << 16;
const CR4_LA57: u64 = 1 << 12;

pub fn complete(insn: &Instruction, state: &CpuState) -> Result<Completion, OperandError> {
    let r = &state.regs;
    let s = &state.sregs;
    let raise = |exception: Exception| Completion::raised(Kind::FsGsBase, *r, exception);
    if s.cs.l == 0 || s.cr4 & CR4_FSGSBASE == 0 {
        return Ok(raise(Exception::plain(UD_VECTOR)));
    }
    let mut regs = kvm_regs {
        rip: insn.next_ip(),
        ..*r
    };
    let mut sregs = None;
    match insn.code() {
        Code::Rdfsbase_r32 | Code::Rdfsbase_r64 => {
            set_register(&mut regs, insn.op0_register(), s.fs.base)?
        }
        Code::Rdgsbase_r32 | Code::Rdgsbase_r64 => {
            set_register(&mut regs, insn.op0_register(), s.gs.base)?
        }
        code => {
            let base = register(r, insn.op0_register())?;
            let va_bits = if s.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
            let high = (base as i64) >> (va_bits - 1);
            if high != 0 && high != -1 {
                return Ok(raise(general_protection()));
            }
            let mut new = *s;
            if matches!(code, Code::Wrfsbase_r32 | Code::Wrfsbase_r64) {
                new.fs.base = base;
            } else {
                new.gs.base = base;
            }
            sregs = Some(new);
        }
    }
    Ok(Completion {
        kind: Kind::FsGsBase,
        regs,
        exception: None,
        sregs,
        kernel_gs_base: None,
        mxcsr: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::complete;
    use super::super::test_machine::*;
    use super::*;

    fn enabled() -> (vm_memory::GuestMemoryMmap, CpuState) {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cr4 |= CR4_FSGSBASE;
        state.sregs.fs.base = 0x7f00_1234_5678;
        state.sregs.gs.base = 0xffff_8880_1f40_0000;
        (mem, state)
    }

    #[test]
    fn reads_bases_into_registers() {
        let (mem, mut state) = enabled();
        state.regs.rax = u64::MAX;
        // rdgsbase rax
        let done = complete(&[0xf3, 0x48, 0x0f, 0xae, 0xc8], &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::FsGsBase);
        assert_eq!(done.regs.rax, 0xffff_8880_1f40_0000);
        assert_eq!(done.regs.rip, CODE_GVA + 5);
        assert!(done.sregs.is_none());
        // rdfsbase ecx: the low half, zero-extended
        state.regs.rcx = u64::MAX;
        let done = complete(&[0xf3, 0x0f, 0xae, 0xc1], &state, &mem).unwrap();
        assert_eq!(done.regs.rcx, 0x1234_5678);
    }

    #[test]
    fn writes_bases_and_checks_canonical() {
        let (mem, mut state) = enabled();
        // wrfsbase rdi
        state.regs.rdi = 0x5555_0000_1000;
        let done = complete(&[0xf3, 0x48, 0x0f, 0xae, 0xd7], &state, &mem).unwrap();
        let sregs = done.sregs.unwrap();
        assert_eq!(sregs.fs.base, 0x5555_0000_1000);
        assert_eq!(sregs.gs.base, state.sregs.gs.base);
        assert_eq!(done.regs.rip, CODE_GVA + 5);
        // wrgsbase rdi with a non-canonical value
        state.regs.rdi = 0x8000_0000_0000_0000;
        let done = complete(&[0xf3, 0x48, 0x0f, 0xae, 0xdf], &state, &mem).unwrap();
        assert_eq!(done.exception, Some(general_protection()));
        assert!(done.sregs.is_none());
        assert_eq!(done.regs.rip, CODE_GVA);
    }

    #[test]
    fn without_cr4_fsgsbase_it_is_invalid() {
        let (mem, mut state) = enabled();
        state.sregs.cr4 &= !CR4_FSGSBASE;
        let done = complete(&[0xf3, 0x48, 0x0f, 0xae, 0xc8], &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(UD_VECTOR));
    }
}
