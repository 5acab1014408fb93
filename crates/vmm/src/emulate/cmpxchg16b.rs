//! `lock cmpxchg16b` on guest memory, done with the host CPU's own instruction so it stays atomic
//! against the guest's other vCPUs (which run on other host threads, on the same memory).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

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
