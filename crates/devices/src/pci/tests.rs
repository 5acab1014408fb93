//! The segment and its access paths together: CF8/CFC and ECAM decoding, BAR placement and
//! dispatch, BAR moves carrying ioeventfds, MSI-X table/control forwarding, INTx routing and
//! masking.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::config::{
    BAR0, COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEMORY, INTERRUPT_LINE, STATUS, STATUS_INTERRUPT,
};
use super::msix::CONTROL_ENABLE;
use super::*;
use crate::bus::BusDevice;
use crate::irq::IrqLine;

const W32: Window = Window {
    start: 0xc000_0000,
    size: 0x2000_0000,
};
const W64: Window = Window {
    start: 0x40_0000_0000,
    size: 0x10_0000_0000,
};

#[derive(Default)]
struct Registry(Mutex<Vec<(bool, u64)>>);
impl IoEventRegistry for Registry {
    fn register(&self, addr: u64, _fd: &EventFd) -> std::io::Result<()> {
        self.0.lock().unwrap().push((true, addr));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> std::io::Result<()> {
        self.0.lock().unwrap().push((false, addr));
        Ok(())
    }
}

#[derive(Default)]
struct Router(Mutex<Vec<(u32, MsiMessage)>>);
impl MsiRouting for Router {
    fn route(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        self.0.lock().unwrap().push((gsi, msg));
        Ok(())
    }
}

/// Which pins the segment connected, to which GSI.
#[derive(Default)]
struct Intx(Mutex<Vec<(u32, Arc<IntxPin>)>>);
impl IntxRouting for Intx {
    fn connect(&self, gsi: u32, pin: Arc<IntxPin>) -> std::io::Result<()> {
        self.0.lock().unwrap().push((gsi, pin));
        Ok(())
    }
    fn disconnect(&self, gsi: u32, pin: &Arc<IntxPin>) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .retain(|(g, p)| *g != gsi || !Arc::ptr_eq(p, pin));
        Ok(())
    }
}

#[derive(Default)]
struct Level(AtomicBool);
impl IntxLevel for Level {
    fn asserted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// BAR 0: 4 KiB of registers (32-bit); BAR 2: 16 KiB, 64-bit, MSI-X table at 0, PBA at 0x800,
/// a notification at 0x1000, and a scratch byte array behind the rest.
struct Fake {
    config: ConfigSpace,
    msix: MsixInterrupts,
    intx: Arc<IntxPin>,
    level: Arc<Level>,
    notify: EventFd,
    regs: Vec<u8>,
    log: Vec<(u8, u64, usize)>,
}

fn fake(pin: u8, router: Arc<Router>) -> (Arc<Mutex<Fake>>, Vec<IrqLine>) {
    let mut config = ConfigSpace::new(PciIds {
        vendor: 0x1af4,
        device: 0x1041,
        class: 0x02,
        ..PciIds::default()
    });
    config.set_interrupt(pin, 0);
    let lines: Vec<IrqLine> = (0..2).map(|i| IrqLine::new(24 + i).unwrap()).collect();
    let layout = MsixLayout {
        vectors: 2,
        table_bar: 2,
        table_offset: 0,
        pba_bar: 2,
        pba_offset: 0x800,
    };
    let msix = Msix::new(layout, lines.clone(), router, &mut config).unwrap();
    let level = Arc::new(Level::default());
    let dev = Fake {
        config,
        msix: MsixInterrupts::new(msix),
        intx: Arc::new(IntxPin::new(level.clone()).unwrap()),
        level,
        notify: EventFd::new(0).unwrap(),
        regs: vec![0; 0x4000],
        log: Vec::new(),
    };
    (Arc::new(Mutex::new(dev)), lines)
}

impl PciDevice for Fake {
    fn config(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn bar_requests(&self) -> Vec<BarRequest> {
        vec![
            BarRequest {
                index: 0,
                size: 0x1000,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
            },
            BarRequest {
                index: 2,
                size: 0x4000,
                kind: BarKind::Memory64 {
                    prefetchable: false,
                },
            },
        ]
    }
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.log.push((bar, offset, data.len()));
        let o = offset as usize;
        data.copy_from_slice(&self.regs[o..o + data.len()]);
    }
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.log.push((bar, offset, data.len()));
        let o = offset as usize;
        self.regs[o..o + data.len()].copy_from_slice(data);
    }
    fn ioeventfds(&self) -> Vec<IoEventFd<'_>> {
        vec![IoEventFd {
            bar: 2,
            offset: 0x1000,
            fd: &self.notify,
        }]
    }
    fn msix(&self) -> Option<&MsixInterrupts> {
        Some(&self.msix)
    }
    fn intx(&self) -> Option<&Arc<IntxPin>> {
        Some(&self.intx)
    }
}

struct Rig {
    segment: SharedSegment,
    cf8: PciConfigIo,
    ecam: PciEcam,
    w32: PciMmioWindow,
    w64: PciMmioWindow,
    registry: Arc<Registry>,
    router: Arc<Router>,
    intx: Arc<Intx>,
}

fn rig() -> Rig {
    let registry = Arc::new(Registry::default());
    let intx = Arc::new(Intx::default());
    let segment = Arc::new(Mutex::new(
        PciSegment::new(W32, W64, registry.clone(), intx.clone()).unwrap(),
    ));
    Rig {
        cf8: PciConfigIo::new(segment.clone()),
        ecam: PciEcam::new(segment.clone()),
        w32: PciMmioWindow::new(segment.clone(), W32.start),
        w64: PciMmioWindow::new(segment.clone(), W64.start),
        segment,
        registry,
        router: Arc::new(Router::default()),
        intx,
    }
}

fn ecam_off(dev: u64, reg: u64) -> u64 {
    (dev << 15) | reg
}

fn read32(d: &mut dyn BusDevice, offset: u64) -> u32 {
    let mut b = [0; 4];
    d.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn cf8_read(cf8: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
    cf8.write(0, &((1 << 31) | (dev << 11) | reg).to_le_bytes());
    read32(cf8, 4)
}

#[test]
fn host_bridge_answers_on_both_mechanisms() {
    let mut r = rig();
    assert_eq!(cf8_read(&mut r.cf8, 0, 0), 0x0d57_8086);
    assert_eq!(
        cf8_read(&mut r.cf8, 0, 8) >> 16,
        0x0600,
        "host bridge class"
    );
    assert_eq!(read32(&mut r.ecam, 0), 0x0d57_8086);
    assert_eq!(read32(&mut r.ecam, ecam_off(1, 0)), u32::MAX, "empty slot");
    assert_eq!(read32(&mut r.ecam, 1 << 20), u32::MAX, "bus 1");
    assert_eq!(read32(&mut r.ecam, 1 << 12), u32::MAX, "function 1");
    // The address register reads back; without the enable bit the data window is all-ones.
    r.cf8.write(0, &0x0000_0000u32.to_le_bytes());
    assert_eq!(read32(&mut r.cf8, 0), 0);
    assert_eq!(read32(&mut r.cf8, 4), u32::MAX);
    r.cf8.write(0, &0x8001_0000u32.to_le_bytes());
    assert_eq!(read32(&mut r.cf8, 4), u32::MAX, "bus 1 via CF8");
}

#[test]
fn narrow_and_odd_accesses_decode_or_are_refused() {
    let mut r = rig();
    r.cf8.write(0, &0x8000_0000u32.to_le_bytes());
    let mut b = [0u8; 2];
    r.cf8.read(6, &mut b);
    assert_eq!(
        u16::from_le_bytes(b),
        0x0d57,
        "CFE: upper word of the dword"
    );
    r.cf8.read(7, &mut b);
    assert_eq!(b, [0xff; 2], "crosses the data window");
    r.cf8.write(0, &[0x12]);
    assert_eq!(
        read32(&mut r.cf8, 0),
        0x8000_0000,
        "byte write does not latch"
    );
    let mut one = [0u8];
    r.ecam.read(2, &mut one);
    assert_eq!(one[0], 0x57);
    r.ecam.read(1, &mut b);
    assert_eq!(b, [0xff; 2], "misaligned ECAM");
    let mut eight = [0u8; 8];
    r.ecam.read(0, &mut eight);
    assert_eq!(eight, [0xff; 8]);
    r.ecam.read(u64::MAX, &mut one);
    r.ecam.write(u64::MAX - 3, &[1, 2, 3, 4]);
    r.w64.read(u64::MAX, &mut one);
    r.w64.write(u64::MAX, &[1]);
    assert_eq!(one[0], 0xff);
}

#[test]
fn bars_are_placed_routed_and_follow_the_guest() {
    let mut r = rig();
    let (dev, _) = fake(1, r.router.clone());
    let slot = r.segment.lock().unwrap().add_device(dev.clone()).unwrap();
    assert_eq!(slot, 1);
    let e = |reg| ecam_off(1, reg);
    assert_eq!(read32(&mut r.ecam, e(0)), 0x1041_1af4);
    assert_eq!(read32(&mut r.ecam, e(BAR0 as u64)), 0xc000_0000);
    assert_eq!(read32(&mut r.ecam, e(BAR0 as u64 + 8)), 0x4);
    assert_eq!(read32(&mut r.ecam, e(BAR0 as u64 + 12)), 0x40);
    assert_eq!(
        read32(&mut r.ecam, e(INTERRUPT_LINE as u64)) & 0xffff,
        0x0100 | intx_gsi(1, 0),
        "INTA# of slot 1 swizzled"
    );

    // Memory decoding off: the BARs do not answer and no ioeventfd is registered.
    assert_eq!(read32(&mut r.w32, 0), u32::MAX);
    assert!(r.registry.0.lock().unwrap().is_empty());
    r.ecam
        .write(e(COMMAND as u64), &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(*r.registry.0.lock().unwrap(), [(true, 0x40_0000_1000)]);

    r.w32.write(0x10, &0xabcdu32.to_le_bytes());
    assert_eq!(read32(&mut r.w32, 0x10), 0xabcd);
    r.w64.write(0x2000, &[7]);
    assert_eq!(dev.lock().unwrap().regs[0x2000], 7);
    assert_eq!(dev.lock().unwrap().log[0], (0, 0x10, 4));
    let mut past = [0u8; 4];
    r.w32.read(0xffe, &mut past);
    assert_eq!(past, [0xff; 4], "straddles the end of BAR 0");

    // The guest sizes BAR 0 (decoding on: Linux would turn it off, we cope either way) and
    // moves BAR 2 to 0x50_0000_0000.
    r.ecam.write(e(BAR0 as u64), &u32::MAX.to_le_bytes());
    assert_eq!(read32(&mut r.ecam, e(BAR0 as u64)), 0xffff_f000);
    r.ecam.write(e(BAR0 as u64), &0xc000_0000u32.to_le_bytes());
    r.ecam.write(e(BAR0 as u64 + 12), &0x50u32.to_le_bytes());
    assert_eq!(
        r.registry.0.lock().unwrap()[1..],
        [(false, 0x40_0000_1000), (true, 0x50_0000_1000)]
    );
    assert_eq!(read32(&mut r.w64, 0x2000), u32::MAX, "old place is empty");
    let w = PciMmioWindow::new(r.segment.clone(), 0x50_0000_0000);
    let mut w = w;
    assert_eq!(read32(&mut w, 0x2000) & 0xff, 7, "found at the new place");

    // Decoding off again: the ioeventfd goes away.
    r.ecam.write(e(COMMAND as u64), &[0, 0]);
    assert_eq!(
        r.registry.0.lock().unwrap().last(),
        Some(&(false, 0x50_0000_1000))
    );
}

#[test]
fn msix_table_and_control_are_served_by_the_segment() {
    let mut r = rig();
    let (dev, lines) = fake(0, r.router.clone());
    r.segment.lock().unwrap().add_device(dev.clone()).unwrap();
    let e = |reg| ecam_off(1, reg);
    assert_eq!(
        read32(&mut r.ecam, e(INTERRUPT_LINE as u64)) & 0xffff,
        0,
        "no INTx pin"
    );
    r.ecam
        .write(e(COMMAND as u64), &COMMAND_MEMORY.to_le_bytes());
    // Program vector 1 through BAR 2 (table at 0), unmasked.
    r.w64.write(0x10, &0xfee0_0000u64.to_le_bytes());
    r.w64.write(0x18, &0x0000_0000_0000_0055u64.to_le_bytes());
    assert!(
        dev.lock().unwrap().log.is_empty(),
        "the device saw none of it"
    );
    let msix = dev.lock().unwrap().msix.clone();
    msix.trigger(1);
    let mut pba = [0u8; 8];
    r.w64.read(0x800, &mut pba);
    assert_eq!(pba[0], 0b10, "pending while MSI-X is disabled");

    // Enable MSI-X through the capability's message control (at cap + 2).
    let cap = read32(&mut r.ecam, e(0x34)) as u64 & 0xff;
    assert_eq!(read32(&mut r.ecam, e(cap)) & 0xff, 0x11);
    r.ecam.write(e(cap + 2), &CONTROL_ENABLE.to_le_bytes());
    assert_eq!(
        lines[1].eventfd().read().unwrap(),
        1,
        "pending vector fired"
    );
    assert_eq!(
        *r.router.0.lock().unwrap(),
        [(
            25,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x55
            }
        )]
    );
    r.w64.read(0x800, &mut pba);
    assert_eq!(pba[0], 0);
    r.w64.write(0x800, &[0xff]);
    r.w64.read(0x800, &mut pba);
    assert_eq!(pba[0], 0, "PBA is read-only");
}

#[test]
fn slots_run_out_and_io_bars_are_refused() {
    let r = rig();
    let mut seg = r.segment.lock().unwrap();
    for want in 1..32u8 {
        let (dev, _) = fake(0, r.router.clone());
        // 31 devices x 4 KiB 32-bit + 16 KiB 64-bit fit the windows easily.
        assert_eq!(seg.add_device(dev).unwrap(), want);
    }
    let (dev, _) = fake(0, r.router.clone());
    assert!(matches!(seg.add_device(dev), Err(PciError::NoFreeSlot)));
}

#[test]
fn intx_is_routed_masked_and_shown_in_status() {
    let mut r = rig();
    let (a, _) = fake(1, r.router.clone());
    let (none, _) = fake(0, r.router.clone());
    let (b, _) = fake(2, r.router.clone());
    let mut seg = r.segment.lock().unwrap();
    for d in [a.clone(), none, b.clone()] {
        seg.add_device(d).unwrap();
    }
    drop(seg);
    // Slot 1 INTA# and slot 3 INTB# on the GSIs of the _PRT swizzle; slot 2 has no pin.
    let connected: Vec<u32> = r.intx.0.lock().unwrap().iter().map(|c| c.0).collect();
    assert_eq!(connected, [17, 16]);
    assert_eq!(
        read32(&mut r.ecam, ecam_off(3, INTERRUPT_LINE as u64)) & 0xffff,
        0x0210
    );
    let e = |reg| ecam_off(1, reg);
    let status = |r: &mut Rig| read32(&mut r.ecam, e(COMMAND as u64)) >> 16;

    let (pin, level) = {
        let d = a.lock().unwrap();
        (d.intx.clone(), d.level.clone())
    };
    assert_eq!(status(&mut r) as u16 & STATUS_INTERRUPT, 0);
    level.0.store(true, Ordering::SeqCst);
    let mut byte = [0u8];
    r.ecam.read(e(STATUS as u64), &mut byte);
    assert_eq!(byte[0] as u16 & STATUS_INTERRUPT, STATUS_INTERRUPT);
    pin.assert().unwrap();
    assert_eq!(pin.trigger_fd().read().unwrap(), 1);

    // Interrupt Disable masks the pin (the condition still shows); clearing it raises the line.
    r.ecam
        .write(e(COMMAND as u64), &COMMAND_INTX_DISABLE.to_le_bytes());
    assert!(pin.masked());
    pin.assert().unwrap();
    assert!(pin.trigger_fd().read().is_err());
    assert_eq!(status(&mut r) as u16 & STATUS_INTERRUPT, STATUS_INTERRUPT);
    r.ecam.write(e(COMMAND as u64), &[0, 0]);
    assert!(!pin.masked());
    assert_eq!(pin.trigger_fd().read().unwrap(), 1, "raised on unmask");

    // MSI-X enabled: no INTx either, whatever the command register says.
    let cap = read32(&mut r.ecam, e(0x34)) as u64 & 0xff;
    r.ecam.write(e(cap + 2), &CONTROL_ENABLE.to_le_bytes());
    assert!(pin.masked());
    r.ecam
        .write(e(COMMAND as u64), &COMMAND_MEMORY.to_le_bytes());
    assert!(pin.masked(), "still MSI-X");
    r.ecam.write(e(cap + 2), &[0, 0]);
    assert!(!pin.masked());
    assert_eq!(pin.trigger_fd().read().unwrap(), 1);
    assert!(
        !b.lock().unwrap().intx.masked(),
        "the other function is untouched"
    );
}

#[test]
fn a_removed_device_is_gone_and_its_slot_and_bars_are_reused() {
    let mut r = rig();
    let (first, _) = fake(1, r.router.clone());
    let (second, _) = fake(1, r.router.clone());
    let mut seg = r.segment.lock().unwrap();
    assert_eq!(seg.add_device(first.clone()).unwrap(), 1);
    assert_eq!(seg.add_device(second.clone()).unwrap(), 2);
    assert_eq!(r.intx.0.lock().unwrap().len(), 2);
    drop(seg);
    r.ecam
        .write(ecam_off(1, COMMAND as u64), &COMMAND_MEMORY.to_le_bytes());
    assert_eq!(*r.registry.0.lock().unwrap(), [(true, 0x40_0000_1000)]);

    let mut seg = r.segment.lock().unwrap();
    assert!(seg.remove_device(0).is_none(), "the host bridge stays");
    assert!(seg.remove_device(9).is_none(), "an empty slot");
    assert!(seg.remove_device(200).is_none(), "no such slot");
    let removed = seg.remove_device(1).expect("slot 1 held a device");
    assert_eq!(
        Arc::as_ptr(&removed) as *const (),
        Arc::as_ptr(&first) as *const ()
    );
    assert!(seg.remove_device(1).is_none(), "only once");
    assert_eq!(
        r.registry.0.lock().unwrap().last(),
        Some(&(false, 0x40_0000_1000)),
        "its ioeventfd is unregistered where it decoded"
    );
    let pins = r.intx.0.lock().unwrap();
    assert_eq!(pins.len(), 1);
    assert!(Arc::ptr_eq(&pins[0].1, &second.lock().unwrap().intx));
    drop(pins);
    assert_eq!(seg.free_slot(), Some(1));
    drop(seg);

    assert_eq!(
        read32(&mut r.ecam, ecam_off(1, 0)),
        u32::MAX,
        "slot 1 is empty"
    );
    assert_eq!(read32(&mut r.w32, 0), u32::MAX, "its BAR no longer answers");
    r.ecam.write(ecam_off(1, COMMAND as u64), &[0xff, 0xff]);
    assert!(first.lock().unwrap().log.is_empty());

    // The next device takes the slot and the BAR space the first one had.
    let (third, _) = fake(1, r.router.clone());
    assert_eq!(r.segment.lock().unwrap().add_device(third).unwrap(), 1);
    assert_eq!(read32(&mut r.ecam, ecam_off(1, BAR0 as u64)), 0xc000_0000);
}
