//! Identity page tables for kernels entered in 64-bit mode: 4 GiB in 2 MiB pages.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{PD_START, PDPT_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;
const PD_COUNT: u64 = 4;

/// Writes the tables and returns the value for CR3.
pub fn write_identity_tables<M: GuestMemoryBackend>(
    mem: &M,
) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_START | PRESENT_RW, GuestAddress(PML4_START))?;
    let mut pd = vec![0u8; (PD_COUNT * 4096) as usize];
    for i in 0..PD_COUNT {
        let pd_addr = PD_START + i * 4096;
        mem.write_obj(pd_addr | PRESENT_RW, GuestAddress(PDPT_START + i * 8))?;
    }
    for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
        let v = ((i as u64) << 21) | PRESENT_RW | PAGE_SIZE_2M;
        entry.copy_from_slice(&v.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_START))?;
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> u64 {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 511) * 8))
            .unwrap();
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 511) * 8))
            .unwrap();
        assert_eq!(pdpte & 0x80, 0, "no 1 GiB pages");
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & 0x83, 0x83);
        (pde & !0x1f_ffff) | (va & 0x1f_ffff)
    }

    #[test]
    fn maps_first_4g_identically() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        for va in [0, 0x1234, 0x20_0000, 0x7fff_ffff, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&mem, cr3, va), va);
        }
    }
}
