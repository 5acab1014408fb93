//! Placement: a bump allocator over the `[rsdp_addr, tables_end)` region.

use crate::AcpiError;

/// Hands out aligned, non-overlapping addresses inside `[start, end)`.
#[derive(Debug)]
pub(crate) struct Placer {
    start: u64,
    next: u64,
    end: u64,
    align: u64,
}

impl Placer {
    /// `start` must be `align`-aligned (`align` is a power of two).
    pub(crate) fn new(start: u64, end: u64, align: u64) -> Result<Self, AcpiError> {
        debug_assert!(align.is_power_of_two());
        if start % align != 0 {
            return Err(AcpiError::MisalignedRsdp(start));
        }
        Ok(Self {
            start,
            next: start,
            end,
            align,
        })
    }

    /// Reserves `len` bytes at the next aligned address.
    pub(crate) fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let overflow = |needed_end| AcpiError::RegionOverflow {
            start: self.start,
            needed_end,
            limit: self.end,
        };
        let addr = self.next;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| addr.checked_add(len))
            .ok_or_else(|| overflow(u64::MAX))?;
        if end > self.end {
            return Err(overflow(end));
        }
        self.next = end.checked_next_multiple_of(self.align).unwrap_or(u64::MAX);
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_aligned_in_order() {
        let mut p = Placer::new(0x1000, 0x1100, 16).unwrap();
        assert_eq!(p.place(36).unwrap(), 0x1000);
        assert_eq!(p.place(1).unwrap(), 0x1030);
        assert_eq!(p.place(0xC0).unwrap(), 0x1040);
        // 0x1100 is exclusive: exactly full is fine, one more byte is not.
        assert!(matches!(
            p.place(1),
            Err(AcpiError::RegionOverflow {
                needed_end: 0x1101,
                ..
            })
        ));
    }

    #[test]
    fn rejects_misaligned_start_and_inverted_region() {
        assert!(matches!(
            Placer::new(0x1008, 0x2000, 16),
            Err(AcpiError::MisalignedRsdp(0x1008))
        ));
        let mut p = Placer::new(0x2000, 0x1000, 16).unwrap();
        assert!(p.place(1).is_err());
    }
}
