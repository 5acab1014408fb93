//! A PCI Express type-0 configuration space (4 KiB): the common header, BARs with size probing,
//! the capability list, and per-bit write masks so a guest can only change what real hardware
//! lets it change.
//!
//! Everything is plain data: writes go through [`ConfigSpace::write`], which merges the guest's
//! bits under the write mask; reads return the stored bytes. BAR sizing falls out of the masks: a
//! BAR's writable bits are exactly its address bits, so writing all-ones reads back the size mask
//! with the read-only type bits below it.

/// Size of the PCIe (extended) configuration space of one function.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const PROG_IF: usize = 0x09;
pub const SUBCLASS: usize = 0x0a;
pub const CLASS_CODE: usize = 0x0b;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

/// Command register bits a guest may set: I/O space, memory space, bus master, parity error
/// response, SERR#, INTx disable.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | COMMAND_INTX_DISABLE;
/// Status: "capabilities list present".
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status: the function's INTx condition holds (set by the segment on reads, read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Capabilities live after the 64-byte header and before the extended space.
const CAP_START: usize = 0x40;
const CAP_END: usize = 0x100;

/// The kind of resource a BAR decodes. Its low bits are read-only and tell the guest which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32 {
        prefetchable: bool,
    },
    /// Takes this BAR and the next one (the upper 32 address bits).
    Memory64 {
        prefetchable: bool,
    },
}

impl BarKind {
    /// The read-only low bits of the BAR register.
    fn flag_bits(self) -> u32 {
        match self {
            BarKind::Io => 0b01,
            BarKind::Memory32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Memory64 { prefetchable } => 0b100 | (u32::from(prefetchable) << 3),
        }
    }

    fn address_mask(self) -> u64 {
        match self {
            BarKind::Io => !0b11,
            _ => !0b1111,
        }
    }

    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Memory64 { .. })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or its upper half is past BAR 5")]
    BadBarIndex(usize),
    #[error("BAR {index} is already in use")]
    BarInUse { index: usize },
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (4 for I/O)")]
    BadBarSize(u64),
    #[error("BAR address {addr:#x} is not aligned to its size {size:#x}")]
    MisalignedBar { addr: u64, size: u64 },
    #[error("capability of {0} bytes does not fit in the remaining configuration space")]
    CapabilityTooLarge(usize),
}

/// What the header says about one implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub kind: BarKind,
    pub size: u64,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_mask: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarInfo>; NUM_BARS],
    /// Offset of the last capability in the list (0: none yet), and where the next one may go.
    last_cap: usize,
    next_cap: usize,
}

/// The identity of a function: what goes in the read-only header fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl ConfigSpace {
    /// A type-0 header with these ids, no BARs, no capabilities, no interrupt pin.
    pub fn new(ids: PciIds) -> Self {
        let mut c = Self {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            write_mask: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: CAP_START,
        };
        c.set_u16(VENDOR_ID, ids.vendor);
        c.set_u16(DEVICE_ID, ids.device);
        c.data[REVISION_ID] = ids.revision;
        c.data[PROG_IF] = ids.prog_if;
        c.data[SUBCLASS] = ids.subclass;
        c.data[CLASS_CODE] = ids.class;
        c.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(SUBSYSTEM_ID, ids.subsystem);
        c.set_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Cache line size and interrupt line are plain scratch registers for software.
        c.write_mask[CACHE_LINE_SIZE] = 0xff;
        c.write_mask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Guest read of `data.len()` bytes at `offset`; out-of-range bytes read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Guest write: only bits set in the write mask change; out-of-range bytes are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                return;
            };
            let mask = self.write_mask[o];
            self.data[o] = (self.data[o] & !mask) | (b & mask);
        }
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Sets a field regardless of the write mask (device side, not guest side).
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        if let Some(dst) = self
            .data
            .get_mut(offset..offset.saturating_add(bytes.len()))
        {
            dst.copy_from_slice(bytes);
        }
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Which bits of `[offset, offset + mask.len())` the guest may write.
    pub fn set_mask(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self
            .write_mask
            .get_mut(offset..offset.saturating_add(mask.len()))
        {
            dst.copy_from_slice(mask);
        }
    }

    /// The INTx pin: 0 none, 1 = INTA# .. 4 = INTD#.
    pub fn interrupt_pin(&self) -> u8 {
        self.data[INTERRUPT_PIN]
    }

    /// Declares the INTx pin (1 = INTA# .. 4 = INTD#) and the line the platform routed it to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.data[INTERRUPT_PIN] = pin;
        self.data[INTERRUPT_LINE] = line;
    }

    /// Implements BAR `index` with `size` bytes (a power of two) at `addr`. A 64-bit BAR also
    /// takes register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
    ) -> Result<(), ConfigError> {
        let regs = if kind.is_64bit() { 2 } else { 1 };
        if index + regs > NUM_BARS {
            return Err(ConfigError::BadBarIndex(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = if kind.is_64bit() { 1 << 63 } else { 1 << 31 };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(ConfigError::BadBarSize(size));
        }
        if addr % size != 0 || (!kind.is_64bit() && addr > u64::from(u32::MAX)) {
            return Err(ConfigError::MisalignedBar { addr, size });
        }
        // The upper half of a 64-bit BAR is marked as used through the lower one.
        if let Some(i) =
            (index..index + regs).find(|&i| self.bars[i].is_some() || self.is_upper_half(i))
        {
            return Err(ConfigError::BarInUse { index: i });
        }
        let reg = BAR0 + 4 * index;
        let mask = !(size - 1) & kind.address_mask();
        self.set_u32(reg, (addr as u32 & mask as u32) | kind.flag_bits());
        self.set_mask(reg, &(mask as u32).to_le_bytes());
        if regs == 2 {
            self.set_u32(reg + 4, (addr >> 32) as u32);
            self.set_mask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(BarInfo { kind, size });
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind.is_64bit())
    }

    /// The BAR implemented at `index` (not the upper half of a 64-bit one).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently holds, as the guest programmed it.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let info = self.bar(index)?;
        let reg = BAR0 + 4 * index;
        let low = u64::from(self.read_u32(reg)) & info.kind.address_mask() & 0xffff_ffff;
        let high = if info.kind.is_64bit() {
            u64::from(self.read_u32(reg + 4)) << 32
        } else {
            0
        };
        Some(high | low)
    }

    /// Appends a capability (`id`, then a next pointer the list fills in, then `body`) and returns
    /// its offset. `body_mask` gives the guest-writable bits of `body` (missing bytes: read-only).
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        body_mask: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_cap;
        let end = offset + len;
        if end > CAP_END {
            return Err(ConfigError::CapabilityTooLarge(len));
        }
        self.data[offset] = id;
        self.data[offset + 1] = 0;
        self.set_bytes(offset + 2, body);
        self.set_mask(offset + 2, &body_mask[..body_mask.len().min(body.len())]);
        if self.last_cap == 0 {
            self.data[CAPABILITIES_POINTER] = offset as u8;
            let status = self.read_u16(STATUS) | STATUS_CAP_LIST;
            self.set_u16(STATUS, status);
        } else {
            self.data[self.last_cap + 1] = offset as u8;
        }
        self.last_cap = offset;
        self.next_cap = end.next_multiple_of(4);
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor: 0x1af4,
            subsystem: 0x0002,
        })
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = space();
        c.write(0, &[0xff; 64]);
        assert_eq!(c.read_u16(VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(DEVICE_ID), 0x1042);
        assert_eq!(c.read_u32(REVISION_ID), 0x0100_0001);
        assert_eq!(c.read_u16(SUBSYSTEM_ID), 0x0002);
        assert_eq!(c.read_u16(STATUS), 0, "status is read-only");
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert_eq!(c.read_u32(BAR0), 0, "unimplemented BARs read 0");
        assert_eq!(c.read_u32(0x30), 0, "no expansion ROM");
        c.write(COMMAND, &[0, 0]);
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask_and_type_bits() {
        let mut c = space();
        c.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x4000,
            0xc000_0000,
        )
        .unwrap();
        c.add_bar(
            2,
            BarKind::Memory64 { prefetchable: true },
            1 << 33,
            0x2_0000_0000 * 8,
        )
        .unwrap();
        c.add_bar(4, BarKind::Io, 0x20, 0x1000).unwrap();
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        assert_eq!(c.bar_address(2), Some(0x10_0000_0000));

        for i in 0..6 {
            c.write(BAR0 + 4 * i, &[0xff; 4]);
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_c000);
        assert_eq!(
            c.read_u32(BAR0 + 8),
            0x0000_000c,
            "64-bit prefetchable, 8 GiB"
        );
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_fffe);
        assert_eq!(c.read_u32(BAR0 + 16), 0xffff_ffe1, "I/O BAR of 32 ports");
        assert_eq!(c.read_u32(BAR0 + 4), 0, "unimplemented BAR 1");

        c.write(BAR0, &0xd000_0123u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        c.write(BAR0 + 8, &0u32.to_le_bytes());
        c.write(BAR0 + 12, &0x40u32.to_le_bytes());
        assert_eq!(c.bar_address(2), Some(0x40_0000_0000));
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = space();
        let m32 = BarKind::Memory32 {
            prefetchable: false,
        };
        let m64 = BarKind::Memory64 {
            prefetchable: false,
        };
        assert_eq!(c.add_bar(6, m32, 16, 0), Err(ConfigError::BadBarIndex(6)));
        assert_eq!(c.add_bar(5, m64, 16, 0), Err(ConfigError::BadBarIndex(5)));
        assert_eq!(c.add_bar(0, m32, 24, 0), Err(ConfigError::BadBarSize(24)));
        assert_eq!(c.add_bar(0, m32, 8, 0), Err(ConfigError::BadBarSize(8)));
        assert!(matches!(
            c.add_bar(0, m32, 0x1000, 0x800),
            Err(ConfigError::MisalignedBar { .. })
        ));
        assert!(matches!(
            c.add_bar(0, m32, 0x1000, 1 << 32),
            Err(ConfigError::MisalignedBar { .. })
        ));
        c.add_bar(0, m64, 0x1000, 0).unwrap();
        assert!(c.add_bar(1, m32, 0x1000, 0).is_err(), "upper half of BAR 0");
        assert!(c.add_bar(0, m32, 0x1000, 0).is_err());
        assert_eq!(c.bar(1), None);
    }

    #[test]
    fn capabilities_chain_and_keep_their_masks() {
        let mut c = space();
        let a = c.add_capability(0x09, &[1, 2], &[]).unwrap();
        let b = c.add_capability(0x11, &[0, 0, 3, 4], &[0, 0xc0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_ne!(c.read_u16(STATUS) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_u32(CAPABILITIES_POINTER) & 0xff, 0x40);
        assert_eq!(c.read_u32(0x40), 0x0201_4409);
        assert_eq!(
            c.read_u32(0x44),
            0x0000_0011,
            "last capability ends the list"
        );
        c.write(0x40, &[0xff; 12]);
        assert_eq!(c.read_u32(0x40), 0x0201_4409);
        assert_eq!(
            c.read_u32(0x44),
            0xc000_0011,
            "only the masked bits changed"
        );
        assert_eq!(c.read_u32(0x48), 0x0000_0403);
        assert_eq!(
            c.add_capability(0x09, &[0; 200], &[]),
            Err(ConfigError::CapabilityTooLarge(202))
        );
    }

    #[test]
    fn out_of_range_accesses_never_panic() {
        let mut c = space();
        let mut b = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE - 2, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        c.read(usize::MAX, &mut b);
        assert_eq!(b, [0xff; 4]);
        c.write(usize::MAX - 1, &[1, 2, 3]);
        c.write(CONFIG_SPACE_SIZE, &[1]);
        c.set_bytes(usize::MAX, &[1, 2]);
        c.set_mask(CONFIG_SPACE_SIZE - 1, &[1, 2]);
        assert_eq!(c.bar_address(9), None);
    }
}
