//! `fwait`: #NM when CR0.MP and CR0.TS are both set; #MF when an unmasked x87 exception is
//! pending (FSW.ES) and CR0.NE asks for native error reporting; otherwise nothing.

use iced_x86::Instruction;
use kvm_bindings::kvm_regs;

use super::{Completion, CpuState, Exception, Kind, NM_VECTOR};

const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const FSW_ES: u16 = 1 << 7;
const MF_VECTOR: u8 = 16;

pub fn complete(insn: &Instruction, state: &CpuState) -> Completion {
    let cr0 = state.sregs.cr0;
    let vector = if cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        Some(NM_VECTOR)
    } else if state.fpu_status & FSW_ES != 0 && cr0 & CR0_NE != 0 {
        Some(MF_VECTOR)
    } else {
        None
    };
    let regs = match vector {
        Some(_) => state.regs,
        None => kvm_regs {
            rip: insn.next_ip(),
            ..state.regs
        },
    };
    Completion {
        kind: Kind::Fwait,
        regs,
        exception: vector.map(Exception::plain),
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
    fn nothing_pending_moves_on() {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cr0 |= CR0_NE | CR0_MP;
        let done = complete(&[0x9b, 0x65], &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::Fwait);
        assert_eq!(done.exception, None);
        assert_eq!(done.regs.rip, CODE_GVA + 1);
    }

    #[test]
    fn pending_exception_or_task_switched_faults() {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cr0 |= CR0_NE;
        state.fpu_status = FSW_ES | 1;
        let done = complete(&[0x9b], &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(MF_VECTOR));
        assert_eq!(done.regs.rip, CODE_GVA);
        state.sregs.cr0 |= CR0_MP | CR0_TS;
        let done = complete(&[0x9b], &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(NM_VECTOR));
        // TS without MP does not trap fwait.
        state.sregs.cr0 &= !CR0_MP;
        state.fpu_status = 0;
        let done = complete(&[0x9b], &state, &mem).unwrap();
        assert_eq!(done.exception, None);
    }
}
