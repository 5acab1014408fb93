//! `popcnt r, r/m` (16, 32 and 64 bits): the destination gets the number of set bits of the
//! source; ZF says whether the source was zero; OF, SF, AF, CF and PF are cleared.

use iced_x86::{Instruction, OpKind};
use kvm_bindings::kvm_regs;
use vm_memory::GuestMemoryMmap;

use super::operands::{OperandError, gpr, memory_operand, read, register, set_register};
use super::{Completion, CpuState, Kind, ZF};

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

pub fn complete(
    insn: &Instruction,
    state: &CpuState,
    mem: &GuestMemoryMmap,
) -> Result<Completion, OperandError> {
    let r = &state.regs;
    // The source is as wide as the destination register.
    let (_, bits) = gpr(insn.op0_register())
        .ok_or_else(|| OperandError::Fail(format!("destination {:?}", insn.op0_register())))?;
    let width = bits as usize / 8;
    let source = match insn.op1_kind() {
        OpKind::Register => register(r, insn.op1_register())?,
        OpKind::Memory => {
            let gva = memory_operand(insn, state)?;
            let mut buf = [0u8; 8];
            match read(mem, state, gva, &mut buf[..width]) {
                Ok(()) => u64::from_le_bytes(buf),
                Err(OperandError::Fault(e)) => {
                    return Ok(Completion::raised(Kind::Popcnt, *r, e));
                }
                Err(e) => return Err(e),
            }
        }
        other => return Err(OperandError::Fail(format!("source operand {other:?}"))),
    };
    let mut regs = kvm_regs {
        rip: insn.next_ip(),
        ..*r
    };
    set_register(
        &mut regs,
        insn.op0_register(),
        u64::from(source.count_ones()),
    )?;
    regs.rflags &= !(OF | SF | ZF | AF | CF | PF);
    if source == 0 {
        regs.rflags |= ZF;
    }
    Ok(Completion::done(Kind::Popcnt, regs))
}

#[cfg(test)]
mod tests {
    use super::super::test_machine::*;
    use super::super::{Exception, complete};
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn register_source_as_linux_hweight64_has_it() {
        let mem = memory();
        let mut state = machine(&mem);
        // popcnt rax, rdi (Linux's __arch_hweight64 after alternatives patching)
        let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0xc7];
        state.regs.rdi = 0xf0f0_0000_0000_0101;
        state.regs.rax = 0xdead;
        state.regs.rflags = 0x2 | CF | OF | SF | ZF;
        let done = complete(&bytes, &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::Popcnt);
        assert_eq!(done.regs.rax, 10);
        assert_eq!(done.regs.rip, CODE_GVA + 5);
        assert_eq!(
            done.regs.rflags, 0x2,
            "flags cleared, ZF too (source not zero)"
        );
        assert_eq!(done.regs.rdi, state.regs.rdi);

        state.regs.rdi = 0;
        let done = complete(&bytes, &state, &mem).unwrap();
        assert_eq!(done.regs.rax, 0);
        assert_eq!(done.regs.rflags, 0x2 | ZF);
    }

    #[test]
    fn widths_and_memory_source() {
        let mem = memory();
        let mut state = machine(&mem);
        // popcnt ecx, dword [rsi+8]: a 32-bit destination clears the upper half.
        mem.write_obj(0xffff_ffff_0000_0007u64, GuestAddress(0x20_0008))
            .unwrap();
        state.regs.rsi = DATA_GVA;
        state.regs.rcx = u64::MAX;
        let done = complete(&[0xf3, 0x0f, 0xb8, 0x4e, 0x08], &state, &mem).unwrap();
        assert_eq!(done.regs.rcx, 3);
        // popcnt dx, word [rsi+0xe]: a 16-bit destination keeps the other bits.
        state.regs.rdx = 0x1234_0000;
        let done = complete(&[0x66, 0xf3, 0x0f, 0xb8, 0x56, 0x0e], &state, &mem).unwrap();
        assert_eq!(done.regs.rdx, 0x1234_0010);
        // popcnt rax, qword [rsi+8]
        let done = complete(&[0xf3, 0x48, 0x0f, 0xb8, 0x46, 0x08], &state, &mem).unwrap();
        assert_eq!(done.regs.rax, 35);
    }

    #[test]
    fn unmapped_source_raises_a_page_fault() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rsi = 0xffff_c900_0000_0000;
        let done = complete(&[0xf3, 0x48, 0x0f, 0xb8, 0x46, 0x08], &state, &mem).unwrap();
        assert_eq!(
            done.exception,
            Some(Exception {
                vector: 14,
                error_code: Some(0),
                address: Some(0xffff_c900_0000_0008)
            })
        );
        assert_eq!(
            done.regs.rip, CODE_GVA,
            "a fault leaves RIP on the instruction"
        );
    }
}
