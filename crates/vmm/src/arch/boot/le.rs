//! Little-endian fields of kernel images. Offsets come from the (untrusted) file: a field that
//! does not fit reads as `None`, never a panic.

fn bytes<const N: usize>(buf: &[u8], at: u64) -> Option<[u8; N]> {
    let start = usize::try_from(at).ok()?;
    buf.get(start..start.checked_add(N)?)?.try_into().ok()
}

pub fn u16_at(buf: &[u8], at: u64) -> Option<u16> {
    bytes(buf, at).map(u16::from_le_bytes)
}

pub fn u32_at(buf: &[u8], at: u64) -> Option<u32> {
    bytes(buf, at).map(u32::from_le_bytes)
}

pub fn u64_at(buf: &[u8], at: u64) -> Option<u64> {
    bytes(buf, at).map(u64::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_bounds_only() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0), Some(0x0201));
        assert_eq!(u32_at(&b, 5), Some(0x0908_0706));
        assert_eq!(u64_at(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(u32_at(&b, 6), None);
        assert_eq!(u64_at(&b, u64::MAX), None);
    }
}
