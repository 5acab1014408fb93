//! Operands of a decoded instruction: general-purpose registers, the memory operand's linear
//! address, and guest memory reached through the guest's page tables, with the faults the CPU
//! would raise on the way.

use iced_x86::{Instruction, OpKind, Register};
use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::translate::{Access, WalkError, translate};
use super::{CpuState, Exception};

const GP_VECTOR: u8 = 13;
const PF_VECTOR: u8 = 14;

/// Why an operand could not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperandError {
    /// The CPU would raise this exception instead of completing the instruction.
    Fault(Exception),
    /// Nothing the CPU would do: the VM must stop (the message says why).
    Fail(String),
}

pub fn general_protection() -> Exception {
    Exception {
        vector: GP_VECTOR,
        error_code: Some(0),
        address: None,
    }
}

/// The linear address of the instruction's memory operand: segment base + base + index * scale +
/// displacement (already absolute for RIP-relative operands), in the instruction's address size.
pub fn memory_operand(insn: &Instruction, state: &CpuState) -> Result<u64, OperandError> {
    if !(0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory) {
        return Err(OperandError::Fail("no memory operand".into()));
    }
    let mut addr = insn.memory_displacement64();
    let base = insn.memory_base();
    if base != Register::None && base != Register::RIP && base != Register::EIP {
        addr = addr.wrapping_add(register(&state.regs, base)?);
    }
    let index = insn.memory_index();
    if index != Register::None {
        let scaled =
            register(&state.regs, index)?.wrapping_mul(u64::from(insn.memory_index_scale()));
        addr = addr.wrapping_add(scaled);
    }
    let address_bits = [base, index]
        .into_iter()
        .find(|r| *r != Register::None && *r != Register::RIP)
        .and_then(gpr)
        .map_or(64, |(_, bits)| bits);
    if address_bits < 64 {
        addr &= (1u64 << address_bits) - 1;
    }
    let s = &state.sregs;
    let segment_base = match insn.memory_segment() {
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        // In 64-bit mode the other segments have base 0, whatever their descriptors say.
        _ if s.cs.l != 0 => 0,
        Register::ES => s.es.base,
        Register::CS => s.cs.base,
        Register::SS => s.ss.base,
        _ => s.ds.base,
    };
    Ok(addr.wrapping_add(segment_base))
}

/// The guest-physical address for an access at `gva`, or the fault the CPU would raise.
pub fn physical(
    mem: &GuestMemoryMmap,
    state: &CpuState,
    gva: u64,
    access: Access,
) -> Result<u64, OperandError> {
    translate(mem, &state.sregs, gva, access, state.accessor()).map_err(|e| match e {
        WalkError::PageFault { error_code } => OperandError::Fault(Exception {
            vector: PF_VECTOR,
            error_code: Some(error_code),
            address: Some(gva),
        }),
        WalkError::NonCanonical => OperandError::Fault(general_protection()),
        other => OperandError::Fail(format!("operand at {gva:#x}: {other}")),
    })
}

/// Reads `buf.len()` bytes at linear address `gva`, page by page.
pub fn read(
    mem: &GuestMemoryMmap,
    state: &CpuState,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), OperandError> {
    let mut done = 0;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let in_page = (0x1000 - (at & 0xfff)) as usize;
        let part = in_page.min(buf.len() - done);
        let gpa = physical(mem, state, at, Access::Read)?;
        mem.read_slice(&mut buf[done..done + part], GuestAddress(gpa))
            .map_err(|_| {
                OperandError::Fail(format!(
                    "operand at {at:#x} (guest-physical {gpa:#x}) is not RAM"
                ))
            })?;
        done += part;
    }
    Ok(())
}

/// A 16-, 32- or 64-bit general-purpose register as (encoding number, width in bits). iced
/// numbers each width's registers contiguously in encoding order (AX, CX, DX, BX, SP, ...).
pub fn gpr(reg: Register) -> Option<(usize, u32)> {
    [(Register::AX, 16), (Register::EAX, 32), (Register::RAX, 64)]
        .into_iter()
        .find_map(|(first, bits)| {
            let n = (reg as usize).checked_sub(first as usize)?;
            (n < 16).then_some((n, bits))
        })
}

fn slot(r: &mut kvm_regs, n: usize) -> &mut u64 {
    match n {
        0 => &mut r.rax,
        1 => &mut r.rcx,
        2 => &mut r.rdx,
        3 => &mut r.rbx,
        4 => &mut r.rsp,
        5 => &mut r.rbp,
        6 => &mut r.rsi,
        7 => &mut r.rdi,
        8 => &mut r.r8,
        9 => &mut r.r9,
        10 => &mut r.r10,
        11 => &mut r.r11,
        12 => &mut r.r12,
        13 => &mut r.r13,
        14 => &mut r.r14,
        _ => &mut r.r15,
    }
}

/// A general-purpose register's value, cut to the register's width.
pub fn register(r: &kvm_regs, reg: Register) -> Result<u64, OperandError> {
    let (n, bits) =
        gpr(reg).ok_or_else(|| OperandError::Fail(format!("register {reg:?} is not supported")))?;
    let file = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let full = file[n];
    Ok(if bits == 64 {
        full
    } else {
        full & ((1u64 << bits) - 1)
    })
}

/// Writes a general-purpose register as the CPU does: a 32-bit write clears the upper half, a
/// 16-bit write keeps the other bits.
pub fn set_register(r: &mut kvm_regs, reg: Register, value: u64) -> Result<(), OperandError> {
    let (n, bits) =
        gpr(reg).ok_or_else(|| OperandError::Fail(format!("register {reg:?} is not supported")))?;
    let dst = slot(r, n);
    *dst = match bits {
        64 => value,
        32 => value & 0xffff_ffff,
        _ => (*dst & !0xffff) | (value & 0xffff),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_by_width() {
        let mut r = kvm_regs {
            rax: 0x1111_2222_3333_4444,
            r15: u64::MAX,
            ..Default::default()
        };
        assert_eq!(register(&r, Register::EAX), Ok(0x3333_4444));
        assert_eq!(register(&r, Register::AX), Ok(0x4444));
        assert_eq!(register(&r, Register::R15D), Ok(0xffff_ffff));
        set_register(&mut r, Register::R15W, 7).unwrap();
        assert_eq!(r.r15, 0xffff_ffff_ffff_0007);
        set_register(&mut r, Register::R15D, 7).unwrap();
        assert_eq!(r.r15, 7);
        set_register(&mut r, Register::RSP, 9).unwrap();
        assert_eq!(r.rsp, 9);
        assert!(
            register(&r, Register::AL).is_err(),
            "8-bit registers are not addresses"
        );
        assert!(register(&r, Register::XMM0).is_err());
    }
}
