//! virtio-vsock's guest-facing paths end to end: a `Vsock` whose host side is Unix sockets in a
//! scratch directory, brought up through the virtio-pci transport. The guest's TX packets (header
//! parsing in `packet.rs`, then the muxer's connection state machine) and the replies the device
//! writes into the guest's RX chains.
//!
//! Device-specific header bytes ([`hyperpool_fuzz::device_case`]): 10..14 a port `P`; 14 bit 0:
//! a host program listens on `PATH_P` (so a guest REQUEST to CID 2 port P connects), bit 1: a
//! host program has asked for a connection to guest port P (`CONNECT P`).
//!
//! The host side acts first (the device starts and serves its sockets), then the guest's TX
//! packets are published and the queues kicked.
//!
//! Checked: no panic on either thread, no hang.

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};

use hyperpool_devices::virtio::Vsock;
use hyperpool_fuzz::device_case::DeviceCase;
use hyperpool_fuzz::memory;
use hyperpool_fuzz::rig::{Rig, rings};
use hyperpool_fuzz::scratch;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const GUEST_CID: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let case = DeviceCase::decode(data);
    let port = u32::from_le_bytes([case.extra[0], case.extra[1], case.extra[2], case.extra[3]]);
    let dir = scratch::dir();
    let path = dir.path().join("v.sock");
    let _listener = (case.extra[4] & 1 != 0)
        .then(|| UnixListener::bind(format!("{}_{port}", path.display())).expect("host listener"));
    let vsock = Vsock::new(GUEST_CID, &path).expect("vsock");
    let _client = (case.extra[4] & 2 != 0).then(|| {
        let mut c = UnixStream::connect(&path).expect("host client");
        c.write_all(format!("CONNECT {port}\n").as_bytes())
            .expect("CONNECT line");
        c
    });

    // The driver publishes its TX packets only once the host side has had its say (a guest
    // answers a host's REQUEST after it arrived), so the TX avail index is held back until then.
    let mem = memory::guest_memory(case.image);
    let tx_avail_idx = GuestAddress(rings(0).1 + 2);
    let published: u16 = mem.read_obj(tx_avail_idx).expect("avail ring");
    mem.write_obj(0u16, tx_avail_idx).expect("avail ring");

    let mut rig = Rig::new(Box::new(vsock), mem, "virtio-vsock");
    // TX in ring slot 0: the rings a short input reaches first.
    if rig.start(case.features, case.queue_size, &[TX, RX, EVENT]) {
        rig.wait_idle();
        rig.memory()
            .write_obj(published, tx_avail_idx)
            .expect("avail ring");
        for q in [RX, TX, EVENT] {
            if case.kick & (1 << q) != 0 {
                rig.kick(q);
            }
        }
        rig.wait_idle();
    }
});
