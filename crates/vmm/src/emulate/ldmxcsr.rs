//! `ldmxcsr m32`: load MXCSR (SSE rounding, exception masks and flags) from memory, as Linux's
//! `kernel_fpu_begin()` does. #UD without CR4.OSFXSR or with CR0.EM, #NM with CR0.TS, #GP(0)
//! when a reserved bit (16..31) is set.

use iced_x86::Instruction;
use kvm_bindings::kvm_regs;
use vm_memory::GuestMemoryMmap;

use super::operands::{OperandError, general_protection, memory_operand, read};
use super::{Completion, CpuState, Exception, Kind, NM_VECTOR, UD_VECTOR};

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const MXCSR_RESERVED: u32 = 0xffff_0000;

pub fn complete(
    insn: &Instruction,
    state: &CpuState,
    mem: &GuestMemoryMmap,
) -> Result<Completion, OperandError> {
    let s = &state.sregs;
    let raise = |exception: Exception| Completion::raised(Kind::Ldmxcsr, state.regs, exception);
    if s.cr0 & CR0_EM != 0 || s.cr4 & CR4_OSFXSR == 0 {
        return Ok(raise(Exception::plain(UD_VECTOR)));
    }
    if s.cr0 & CR0_TS != 0 {
        return Ok(raise(Exception::plain(NM_VECTOR)));
    }
    let gva = memory_operand(insn, state)?;
    let mut buf = [0u8; 4];
    match read(mem, state, gva, &mut buf) {
        Ok(()) => {}
        Err(OperandError::Fault(e)) => return Ok(raise(e)),
        Err(e) => return Err(e),
    }
    let value = u32::from_le_bytes(buf);
    if value & MXCSR_RESERVED != 0 {
        return Ok(raise(general_protection()));
    }
    Ok(Completion {
        kind: Kind::Ldmxcsr,
        regs: kvm_regs {
            rip: insn.next_ip(),
            ..state.regs
        },
        exception: None,
        sregs: None,
        kernel_gs_base: None,
        mxcsr: Some(value),
    })
}

#[cfg(test)]
mod tests {
    use super::super::complete;
    use super::super::test_machine::*;
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// `ldmxcsr [rsp+4]`, as Linux's kernel_fpu_begin_mask() has it.
    const LDMXCSR_RSP_4: &[u8] = &[0x0f, 0xae, 0x54, 0x24, 0x04];

    fn ready() -> (vm_memory::GuestMemoryMmap, CpuState) {
        let mem = memory();
        let mut state = machine(&mem);
        state.sregs.cr4 |= CR4_OSFXSR;
        state.regs.rsp = DATA_GVA + 0x100;
        (mem, state)
    }

    #[test]
    fn loads_mxcsr_from_memory() {
        let (mem, state) = ready();
        mem.write_obj(0x1f80u32 | 0x8000, GuestAddress(0x20_0104))
            .unwrap();
        let done = complete(LDMXCSR_RSP_4, &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::Ldmxcsr);
        assert_eq!(done.mxcsr, Some(0x9f80));
        assert_eq!(done.regs.rip, CODE_GVA + 5);
        assert_eq!(done.exception, None);
    }

    #[test]
    fn reserved_bits_and_control_registers_fault() {
        let (mem, mut state) = ready();
        mem.write_obj(0x1_1f80u32, GuestAddress(0x20_0104)).unwrap();
        let done = complete(LDMXCSR_RSP_4, &state, &mem).unwrap();
        assert_eq!(done.exception, Some(general_protection()));
        assert_eq!(done.mxcsr, None);
        state.sregs.cr0 |= CR0_TS;
        let done = complete(LDMXCSR_RSP_4, &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(NM_VECTOR));
        state.sregs.cr4 &= !CR4_OSFXSR;
        let done = complete(LDMXCSR_RSP_4, &state, &mem).unwrap();
        assert_eq!(done.exception.map(|e| e.vector), Some(UD_VECTOR));
    }
}
