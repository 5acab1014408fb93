//! `clac` and `stac`: clear or set RFLAGS.AC, which lets the kernel touch user pages under SMAP.
//! Only ring 0 may run them (#UD elsewhere).

use iced_x86::{Code, Instruction};
use kvm_bindings::kvm_regs;

use super::{Completion, CpuState, Exception, Kind, UD_VECTOR};

const AC: u64 = 1 << 18;

pub fn complete(insn: &Instruction, state: &CpuState) -> Completion {
    let r = &state.regs;
    if state.sregs.cs.selector & 3 != 0 {
        return Completion::raised(Kind::ClacStac, *r, Exception::plain(UD_VECTOR));
    }
    let rflags = if insn.code() == Code::Stac {
        r.rflags | AC
    } else {
        r.rflags & !AC
    };
    Completion {
        kind: Kind::ClacStac,
        regs: kvm_regs {
            rip: insn.next_ip(),
            rflags,
            ..*r
        },
        exception: None,
        sregs: None,
        kernel_gs_base: None,
        mxcsr: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::complete;
    use super::super::test_machine::*;
    use super::*;

    #[test]
    fn clac_and_stac_flip_ac_only() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rflags = 0x246 | AC;
        let clac = complete(&[0x0f, 0x01, 0xca], &state, &mem).unwrap();
        assert_eq!(clac.kind, Kind::ClacStac);
        assert_eq!(clac.regs.rflags, 0x246);
        assert_eq!(clac.regs.rip, CODE_GVA + 3);
        state.regs.rflags = 0x246;
        let stac = complete(&[0x0f, 0x01, 0xcb], &state, &mem).unwrap();
        assert_eq!(stac.regs.rflags, 0x246 | AC);
        assert_eq!(stac.exception, None);
    }

    #[test]
    fn user_mode_gets_invalid_opcode() {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cs.selector = 0x33;
        let done = complete(&[0x0f, 0x01, 0xcb], &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(UD_VECTOR));
        assert_eq!(done.regs.rip, CODE_GVA);
        assert_eq!(done.regs.rflags & AC, 0);
    }
}
