//! The PCI hotplug controller's registers as the guest reaches them (any offset, any length,
//! any value), between host plugs and removal requests.
//!
//! Checked after every step, against a model of what the host asked for: an eject is reported
//! only for slots whose removal the host requested and the guest has not ejected yet (never
//! the host bridge, never an empty report); the read-to-clear bitmaps give back
//! exactly what the host set since the last aligned read; nothing panics.

#![no_main]

use std::sync::{Arc, Mutex};

use hyperpool_devices::BusDevice;
use hyperpool_devices::pci::PciHotplug;
use hyperpool_devices::pci::hotplug::{B0EJ, PCID, PCIU};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let reports = Arc::new(Mutex::new(Vec::new()));
    let log = reports.clone();
    let mut dev = PciHotplug::new();
    dev.on_eject(Box::new(move |slots| log.lock().unwrap().push(slots)));
    // The model: bitmaps pending a read, and removals the guest may eject.
    let (mut up, mut down, mut removing) = (0u32, 0u32, 0u32);
    for op in data.chunks(6) {
        let [kind, a, b, c, d, e] = <[u8; 6]>::try_from(op).unwrap_or([op[0], 0, 0, 0, 0, 0]);
        let slot = a % 34; // a few out of range
        let bit = if (1..32).contains(&slot) {
            1u32 << slot
        } else {
            0
        };
        match kind % 4 {
            0 => {
                dev.plugged(slot);
                up |= bit;
                down &= !bit;
                removing &= !bit;
            }
            1 => {
                dev.request_removal(slot);
                down |= bit;
                up &= !bit;
                removing |= bit;
            }
            2 => {
                let offset = u64::from(b % 16);
                let len = usize::from(c % 9);
                let mut buf = vec![0xaau8; len];
                dev.read(offset, &mut buf);
                let value = (len == 4).then(|| u32::from_le_bytes(buf[..].try_into().unwrap()));
                match (offset, value) {
                    (PCIU, Some(v)) => assert_eq!(v, std::mem::take(&mut up)),
                    (PCID, Some(v)) => assert_eq!(v, std::mem::take(&mut down)),
                    _ => assert!(buf.iter().all(|&x| x == 0), "{offset:#x}: {buf:?}"),
                }
            }
            _ => {
                let offset = u64::from(b % 16);
                let value = u32::from_le_bytes([c, d, e, a]);
                let len = usize::from(kind >> 2) % 9;
                let bytes = value.to_le_bytes();
                let mut buf = vec![0u8; len];
                buf[..len.min(4)].copy_from_slice(&bytes[..len.min(4)]);
                let before = reports.lock().unwrap().len();
                dev.write(offset, &buf);
                let after = reports.lock().unwrap().clone();
                let ejected = if offset == B0EJ && len == 4 {
                    value & removing
                } else {
                    0
                };
                if ejected == 0 {
                    assert_eq!(after.len(), before, "no eject: {offset:#x} {buf:?}");
                } else {
                    assert_eq!(after[before..], [ejected]);
                    removing &= !ejected;
                }
            }
        }
    }
    for r in reports.lock().unwrap().iter() {
        assert_ne!(*r, 0);
        assert_eq!(r & 1, 0, "the host bridge is never ejected");
    }
});
