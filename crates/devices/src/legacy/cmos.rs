//! MC146818 CMOS RTC and NVRAM (ports 0x70/0x71): the guest's wall clock at boot, and the
//! memory-size bytes firmware conventionally leaves there.

use time::OffsetDateTime;

use crate::bus::BusDevice;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const STATUS_A: usize = 0x0a;
const STATUS_B: usize = 0x0b;
const STATUS_C: usize = 0x0c;
const STATUS_D: usize = 0x0d;
const CENTURY: usize = 0x32;
/// RAM between 16 MiB and the 32-bit hole, in 64 KiB units (SeaBIOS/QEMU convention).
const MEM_ABOVE_16M_LO: usize = 0x34;
/// RAM above 4 GiB, in 64 KiB units, three bytes.
const MEM_ABOVE_4G: usize = 0x5b;

const STATUS_B_24H: u8 = 1 << 1;
const STATUS_B_BINARY: u8 = 1 << 2;
const STATUS_D_VALID_RAM: u8 = 1 << 7;

/// Ports 0x70 (index, bit 7 = NMI mask) and 0x71 (data).
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
    clock: fn() -> OffsetDateTime,
}

impl Cmos {
    pub const PORT: u16 = 0x70;
    pub const PORT_SPAN: u64 = 2;

    /// `below_4g` and `above_4g` are the guest's RAM sizes in bytes on each side of the hole.
    pub fn new(below_4g: u64, above_4g: u64) -> Self {
        Self::with_clock(below_4g, above_4g, OffsetDateTime::now_utc)
    }

    fn with_clock(below_4g: u64, above_4g: u64, clock: fn() -> OffsetDateTime) -> Self {
        let mut nvram = [0u8; 128];
        nvram[STATUS_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        nvram[STATUS_B] = STATUS_B_24H;
        nvram[STATUS_D] = STATUS_D_VALID_RAM;
        let above_16m = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        nvram[MEM_ABOVE_16M_LO..MEM_ABOVE_16M_LO + 2].copy_from_slice(&above_16m.to_le_bytes());
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        nvram[MEM_ABOVE_4G..MEM_ABOVE_4G + 3].copy_from_slice(&high.to_le_bytes()[..3]);
        Self {
            index: 0,
            nvram,
            clock,
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.nvram[STATUS_B] & STATUS_B_BINARY != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn register(&self, reg: usize) -> u8 {
        let now = (self.clock)();
        let year = now.year().rem_euclid(10_000) as u32;
        match reg {
            SECONDS => self.encode(now.second()),
            MINUTES => self.encode(now.minute()),
            HOURS => self.encode(now.hour()),
            WEEKDAY => self.encode(now.weekday().number_from_sunday()),
            DAY => self.encode(now.day()),
            MONTH => self.encode(u8::from(now.month())),
            YEAR => self.encode((year % 100) as u8),
            CENTURY => self.encode((year / 100) as u8),
            // Reading C clears pending interrupt flags; none are ever raised.
            STATUS_C => 0,
            r => self.nvram[r],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            1 => self.register(usize::from(self.index & 0x7f)),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v,
            1 => {
                let reg = usize::from(self.index & 0x7f);
                match reg {
                    // The clock follows the host; guest writes to it are dropped. Status B keeps
                    // the format bits so a guest may choose binary mode.
                    SECONDS..=YEAR | STATUS_C | STATUS_D | CENTURY => {}
                    STATUS_B => self.nvram[reg] = v & (STATUS_B_24H | STATUS_B_BINARY),
                    _ => self.nvram[reg] = v,
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn fixed() -> OffsetDateTime {
        datetime!(2026-11-27 22:38:41 UTC)
    }

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg | 0x80]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reports_host_time_in_bcd_then_binary() {
        let mut c = Cmos::with_clock(128 << 20, 0, fixed);
        assert_eq!(read(&mut c, 0x00), 0x41);
        assert_eq!(read(&mut c, 0x02), 0x38);
        assert_eq!(read(&mut c, 0x04), 0x22);
        assert_eq!(read(&mut c, 0x07), 0x27);
        assert_eq!(read(&mut c, 0x08), 0x11);
        assert_eq!(read(&mut c, 0x09), 0x26);
        assert_eq!(read(&mut c, 0x32), 0x20);
        assert_eq!(read(&mut c, 0x06), 6, "Friday, Sunday = 1");
        c.write(0, &[0x0b]);
        c.write(1, &[STATUS_B_24H | STATUS_B_BINARY]);
        assert_eq!(read(&mut c, 0x00), 41);
        assert_eq!(read(&mut c, 0x09), 26);
    }

    #[test]
    fn memory_size_bytes_and_nvram() {
        let mut c = Cmos::with_clock(3 << 30, 1 << 30, fixed);
        let lo = u16::from_le_bytes([read(&mut c, 0x34), read(&mut c, 0x35)]);
        assert_eq!(u64::from(lo), ((3u64 << 30) - (16 << 20)) >> 16);
        assert_eq!(read(&mut c, 0x5c), 0x40, "1 GiB = 0x4000 units of 64 KiB");
        c.write(0, &[0x40]);
        c.write(1, &[0xab]);
        assert_eq!(read(&mut c, 0x40), 0xab);
        c.write(0, &[0x00]);
        c.write(1, &[0x99]);
        assert_eq!(read(&mut c, 0x00), 0x41, "clock writes are dropped");
        assert_eq!(read(&mut c, 0x0d), 0x80);
    }
}
