//! The boot GDT and the KVM segment registers that mirror it.

use kvm_bindings::kvm_segment;

/// Access/flags nibbles as packed in a descriptor: `G D/B L AVL` in the high byte's upper half,
/// `P DPL S TYPE` in the low byte.
const CODE32: u16 = 0xc09b;
const CODE64: u16 = 0xa09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x008b;

/// Selectors: Linux's 64-bit boot protocol wants CS 0x10 and DS 0x18; PVH and Multiboot leave
/// the values to us, and use the 32-bit code segment.
pub const CODE32_SEL: u16 = 0x08;
pub const CODE64_SEL: u16 = 0x10;
pub const DATA_SEL: u16 = 0x18;
pub const TSS_SEL: u16 = 0x20;

/// The table, in selector order.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        entry(CODE32, 0, 0xfffff),
        entry(CODE64, 0, 0xfffff),
        entry(DATA, 0, 0xfffff),
        entry(TSS, 0, 0xfffff),
    ]
}

/// Encodes a segment descriptor.
pub fn entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden (cached) part of a segment register loaded from `descriptor` with `selector`.
pub fn segment(descriptor: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((descriptor >> n) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = ((descriptor >> 32) & 0x000f_0000) | (descriptor & 0xffff);
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    } as u32;
    kvm_segment {
        base: ((descriptor >> 16) & 0x00ff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit,
        selector,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((descriptor >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The segment for `selector` in [`boot_gdt`].
pub fn boot_segment(selector: u16) -> kvm_segment {
    segment(boot_gdt()[usize::from(selector >> 3)], selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_manual() {
        assert_eq!(entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(entry(CODE32, 0x1234_5678, 0xabcde), 0x12ca_9b34_5678_bcde);
    }

    #[test]
    fn segments_decode_back() {
        let cs = boot_segment(CODE64_SEL);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!((cs.type_, cs.limit, cs.base), (0xb, 0xffff_ffff, 0));
        let cs32 = boot_segment(CODE32_SEL);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = boot_segment(DATA_SEL);
        assert_eq!((ds.type_, ds.db, ds.unusable), (3, 1, 0));
        let tss = boot_segment(TSS_SEL);
        assert_eq!((tss.type_, tss.s, tss.g), (0xb, 0, 0));
        let odd = segment(entry(CODE32, 0x1234_5678, 0xabcde), 8);
        assert_eq!(odd.base, 0x1234_5678);
        assert_eq!(odd.limit, 0xabcd_efff);
    }
}
