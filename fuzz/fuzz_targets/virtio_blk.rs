//! virtio-blk end to end: a `Block` on a raw image (tmpfs), brought up through the virtio-pci
//! transport, serving whatever chains and request headers the guest memory holds — parsing
//! (`request.rs`) and execution (read, write, flush, GET_ID, DISCARD, WRITE_ZEROES) on the
//! device's own thread.
//!
//! Device-specific header bytes ([`hyperpool_fuzz::device_case`]): 10 bit 0 read-only; 11 queues
//! - 1 (modulo 4); 12..14 image size in sectors - 1 (modulo 128).
//!
//! Checked: no panic on either thread, no hang; the image never changes size (nothing is written
//! past the disk's end), and a read-only disk is never modified.

#![no_main]

use hyperpool_devices::virtio::Block;
use hyperpool_fuzz::device_case::DeviceCase;
use hyperpool_fuzz::memory;
use hyperpool_fuzz::rig::Rig;
use hyperpool_fuzz::scratch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let case = DeviceCase::decode(data);
    let readonly = case.extra[0] & 1 != 0;
    let num_queues = u16::from(case.extra[1] % 4) + 1;
    let sectors = usize::from(u16::from_le_bytes([case.extra[2], case.extra[3]]) % 128) + 1;
    // Every sector different, so a read from the wrong place shows.
    let disk: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8).rotate_left(3))
        .collect();
    let dir = scratch::dir();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, &disk).expect("writing the image");

    let dev =
        Block::open_raw(&path, readonly, num_queues, Some("fuzz")).expect("opening the image");
    let mut rig = Rig::new(
        Box::new(dev),
        memory::guest_memory(case.image),
        "virtio-blk",
    );
    let queues: Vec<usize> = (0..usize::from(num_queues)).collect();
    if rig.start(case.features, case.queue_size, &queues) {
        for &q in &queues {
            if case.kick & (1 << q) != 0 {
                rig.kick(q);
            }
        }
        rig.wait_idle();
    }
    drop(rig); // stops and joins the device thread

    let after = std::fs::read(&path).expect("reading the image back");
    assert_eq!(after.len(), disk.len(), "the image changed size");
    if readonly {
        assert!(after == disk, "a read-only disk was modified");
    }
});
