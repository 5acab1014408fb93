//! `lock cmpxchg16b` on guest memory, done with the host CPU's own instruction so it stays atomic
//! against the guest's other vCPUs (which run on other host threads, on the same memory).

use iced_x86::Instruction;
use kvm_bindings::kvm_regs;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::operands::{OperandError, general_protection, memory_operand, physical};
use super::translate::Access;
use super::{Completion, CpuState, Exception, Kind, ZF};

/// What the compare-exchange found: `swapped` is ZF; `previous` is what RDX:RAX must hold after
/// the instruction (the old value when it did not swap, the expected one when it did).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub swapped: bool,
    pub previous: u128,
}

/// Compares the 16 bytes at `gpa` with `expected` and, if equal, writes `new`, atomically.
/// `gpa` must be 16-byte aligned (the caller raises #GP otherwise); None if it is not RAM.
pub fn cmpxchg16b(mem: &GuestMemoryMmap, gpa: u64, expected: u128, new: u128) -> Option<Outcome> {
    if gpa % 16 != 0 {
        return None;
    }
    let slice = mem.get_slice(GuestAddress(gpa), 16).ok()?;
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    // Guest regions are page-aligned mappings, so an aligned guest address is an aligned host one;
    // checked anyway because the instruction faults on a misaligned operand.
    if ptr as usize % 16 != 0 || slice.len() != 16 {
        return None;
    }
    let (mut rax, mut rdx) = (expected as u64, (expected >> 64) as u64);
    let swapped: u8;
    // SAFETY: `ptr` points to 16 bytes of guest memory that vm-memory vouched for (one region,
    // mapped while `slice` lives) and is 16-byte aligned, as cmpxchg16b requires. Guest memory is
    // shared with the guest, which may change it at any time: the locked instruction is exactly
    // how the guest itself accesses it. RBX cannot be named as an operand, so it is swapped in
    // and out through a scratch register around the instruction.
    unsafe {
        std::arch::asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "mov rbx, {new_lo}",
            "sete {swapped}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            swapped = out(reg_byte) swapped,
            inout("rax") rax,
            inout("rdx") rdx,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    Some(Outcome {
        swapped: swapped != 0,
        previous: (u128::from(rdx) << 64) | u128::from(rax),
    })
}

/// `lock cmpxchg16b m128`: compare RDX:RAX with the operand; equal: store RCX:RBX and set ZF;
/// not equal: load the operand into RDX:RAX and clear ZF. The operand must be 16-byte aligned
/// (#GP(0) otherwise) and writable (#PF).
pub fn complete(
    insn: &Instruction,
    state: &CpuState,
    mem: &GuestMemoryMmap,
) -> Result<Completion, OperandError> {
    let r = &state.regs;
    let fault = |exception: Exception| Completion::raised(Kind::LockCmpxchg16b, *r, exception);
    let gva = memory_operand(insn, state)?;
    if gva % 16 != 0 {
        return Ok(fault(general_protection()));
    }
    let gpa = match physical(mem, state, gva, Access::Write) {
        Ok(gpa) => gpa,
        Err(OperandError::Fault(e)) => return Ok(fault(e)),
        Err(e) => return Err(e),
    };
    let expected = (u128::from(r.rdx) << 64) | u128::from(r.rax);
    let new = (u128::from(r.rcx) << 64) | u128::from(r.rbx);
    let outcome = cmpxchg16b(mem, gpa, expected, new).ok_or_else(|| {
        OperandError::Fail(format!(
            "operand at {gva:#x} (guest-physical {gpa:#x}) is not RAM"
        ))
    })?;
    let mut regs = kvm_regs {
        rip: insn.next_ip(),
        ..*r
    };
    if outcome.swapped {
        regs.rflags |= ZF;
    } else {
        regs.rflags &= !ZF;
        regs.rax = outcome.previous as u64;
        regs.rdx = (outcome.previous >> 64) as u64;
    }
    Ok(Completion::done(Kind::LockCmpxchg16b, regs))
}

#[cfg(test)]
mod tests {
    use super::super::complete;
    use super::super::test_machine::*;
    use super::*;
    use vm_memory::Bytes;

    /// `lock cmpxchg16b [rbp+0x20]`, as Linux's SLUB has it (and the bytes after it).
    const CMPXCHG16B_RBP_20: &[u8] = &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20, 0x74, 0x20];

    #[test]
    fn cmpxchg16b_swaps_on_match() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20 + 0x40;
        let old: u128 = (0x1111 << 64) | 0x2222;
        mem.write_obj(old, GuestAddress(0x20_0040)).unwrap();
        state.regs.rdx = 0x1111;
        state.regs.rax = 0x2222;
        state.regs.rcx = 0x3333;
        state.regs.rbx = 0x4444;
        let done = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(done.kind, Kind::LockCmpxchg16b);
        assert_eq!(done.exception, None);
        assert_eq!(done.regs.rip, CODE_GVA + 6);
        assert_ne!(done.regs.rflags & ZF, 0);
        assert_eq!((done.regs.rdx, done.regs.rax), (0x1111, 0x2222));
        let now: u128 = mem.read_obj(GuestAddress(0x20_0040)).unwrap();
        assert_eq!(now, (0x3333 << 64) | 0x4444);
        let pte: u64 = mem
            .read_obj(GuestAddress(0x4000 + ((DATA_GVA >> 12) & 0x1ff) * 8))
            .unwrap();
        assert_ne!(pte & (1 << 6), 0, "the page is dirty");
    }

    #[test]
    fn cmpxchg16b_loads_on_mismatch() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20;
        state.regs.rflags |= ZF;
        let old: u128 = (0xdead << 64) | 0xbeef;
        mem.write_obj(old, GuestAddress(0x20_0000)).unwrap();
        state.regs.rcx = 0x3333;
        state.regs.rbx = 0x4444;
        let done = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(done.regs.rflags & ZF, 0);
        assert_eq!((done.regs.rdx, done.regs.rax), (0xdead, 0xbeef));
        assert_eq!(done.regs.rcx, 0x3333);
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0000)).unwrap(), old);
    }

    #[test]
    fn cmpxchg16b_with_gs_and_index() {
        let mem = memory();
        let mut state = machine(&mem);
        // lock cmpxchg16b gs:[rsi+rdi*8+0x10]
        let bytes = [0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x4c, 0xfe, 0x10];
        state.sregs.gs.base = DATA_GVA - 0x1000;
        state.regs.rsi = 0x1000;
        state.regs.rdi = 4;
        let done = complete(&bytes, &state, &mem).unwrap();
        assert_ne!(done.regs.rflags & ZF, 0, "zero matched zero");
        assert_eq!(done.regs.rip, CODE_GVA + 8);
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0030)).unwrap(), 0);
        state.regs.rbx = 7;
        complete(&bytes, &state, &mem).unwrap();
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x20_0030)).unwrap(), 7);
    }

    #[test]
    fn cmpxchg16b_faults_as_the_cpu_would() {
        let mem = memory();
        let mut state = machine(&mem);
        state.regs.rbp = DATA_GVA - 0x20 + 8;
        let gp = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(gp.exception, Some(general_protection()), "misaligned");
        assert_eq!(
            gp.regs.rip, CODE_GVA,
            "a fault pushes the instruction's own RIP"
        );

        let in_code_page = (CODE_GVA & !0xfff) + 0x100;
        state.regs.rbp = in_code_page - 0x20;
        let ro = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(
            ro.exception,
            Some(Exception {
                vector: 14,
                error_code: Some(0b11),
                address: Some(in_code_page)
            }),
            "write to a read-only page"
        );

        state.regs.rbp = 0xffff_c900_0000_0000;
        let np = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap();
        assert_eq!(np.exception.unwrap().error_code, Some(0b10));
    }

    #[test]
    fn operand_outside_ram_is_refused() {
        let mem = memory();
        let mut state = machine(&mem);
        map_4k(&mem, DATA_GVA, 0x7000_0000, 0x3);
        state.regs.rbp = DATA_GVA - 0x20;
        let err = complete(CMPXCHG16B_RBP_20, &state, &mem).unwrap_err();
        assert!(err.0.contains("not RAM"), "{err}");
    }

    #[test]
    fn swaps_when_equal_and_reports_the_old_value_when_not() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let old: u128 = 0x1111_2222_3333_4444_5555_6666_7777_8888;
        let new: u128 = 0xaaaa_bbbb_cccc_dddd_eeee_ffff_0000_1111;
        mem.write_obj(old, GuestAddress(0x2010)).unwrap();

        let miss = cmpxchg16b(&mem, 0x2010, old + 1, new).unwrap();
        assert_eq!(
            miss,
            Outcome {
                swapped: false,
                previous: old
            }
        );
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x2010)).unwrap(), old);

        let hit = cmpxchg16b(&mem, 0x2010, old, new).unwrap();
        assert_eq!(
            hit,
            Outcome {
                swapped: true,
                previous: old
            }
        );
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x2010)).unwrap(), new);
        // The neighbours are untouched.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2008)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2020)).unwrap(), 0);
    }

    #[test]
    fn refuses_misaligned_and_out_of_ram() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert_eq!(cmpxchg16b(&mem, 0x2008, 0, 1), None);
        assert_eq!(cmpxchg16b(&mem, 0x10000, 0, 1), None);
        assert_eq!(cmpxchg16b(&mem, u64::MAX - 15, 0, 1), None);
    }
}
