//! `swapgs`: exchange GS.base with MSR_KERNEL_GS_BASE, as Linux does on every entry from and
//! exit to user mode. Only 64-bit ring 0 may run it (#UD elsewhere).

use iced_x86::Instruction;
use kvm_bindings::kvm_regs;

use super::{Completion, CpuState, Exception, Kind, UD_VECTOR};

pub fn complete(insn: &Instruction, state: &CpuState) -> Completion {
    let r = &state.regs;
    if state.sregs.cs.l == 0 || state.sregs.cs.selector & 3 != 0 {
        return Completion::raised(Kind::Swapgs, *r, Exception::plain(UD_VECTOR));
    }
    let mut sregs = state.sregs;
    sregs.gs.base = state.kernel_gs_base;
    Completion {
        kind: Kind::Swapgs,
        regs: kvm_regs {
            rip: insn.next_ip(),
            ..*r
        },
        exception: None,
        sregs: Some(sregs),
        kernel_gs_base: Some(state.sregs.gs.base),
        mxcsr: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::complete;
    use super::super::test_machine::*;
    use super::*;

    const SWAPGS: &[u8] = &[0x0f, 0x01, 0xf8];

    #[test]
    fn exchanges_gs_base_with_the_msr() {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.gs.base = 0;
        state.kernel_gs_base = 0xffff_8880_1f40_0000;
        let done = complete(SWAPGS, &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::Swapgs);
        assert_eq!(done.sregs.unwrap().gs.base, 0xffff_8880_1f40_0000);
        assert_eq!(done.kernel_gs_base, Some(0));
        assert_eq!(done.regs.rip, CODE_GVA + 3);
        assert_eq!(done.exception, None);
    }

    #[test]
    fn user_mode_gets_invalid_opcode() {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cs.selector = 0x33;
        let done = complete(SWAPGS, &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(UD_VECTOR));
        assert!(done.sregs.is_none() && done.kernel_gs_base.is_none());
    }
}
