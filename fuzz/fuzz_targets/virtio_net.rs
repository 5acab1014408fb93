//! virtio-net's guest-facing paths end to end: a `Net` on a SOCK_SEQPACKET pair standing in for
//! the TAP, brought up through the virtio-pci transport. The guest's TX chains (vnet header and
//! frame) go out to the peer socket; frames queued on the peer beforehand are delivered into
//! whatever RX chains the guest posted.
//!
//! Device-specific header bytes ([`hyperpool_fuzz::device_case`]): 10 frames to deliver to the
//! guest (modulo 5); 11..13 their length (modulo MAX_FRAME + 1).
//!
//! Checked: no panic, no hang; every frame the device sends to the TAP is a whole vnet header
//! plus at most one maximal frame, and asks only for the offloads the driver negotiated.

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use hyperpool_devices::virtio::net::device::{MAX_FRAME, feature};
use hyperpool_devices::virtio::net::{Net, Tap};
use hyperpool_fuzz::device_case::DeviceCase;
use hyperpool_fuzz::memory;
use hyperpool_fuzz::rig::Rig;
use libfuzzer_sys::fuzz_target;

const RX: usize = 0;
const TX: usize = 1;
const VNET_HDR_LEN: usize = 12;

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What the device may hand the TAP: the header's offloads must have been negotiated.
fn check_sent(frame: &[u8], features: u64) {
    assert!(
        (VNET_HDR_LEN..=MAX_FRAME).contains(&frame.len()),
        "sent a frame of {} bytes",
        frame.len()
    );
    let (flags, gso) = (frame[0], frame[1]);
    if flags & 1 != 0 {
        assert_ne!(features & feature::CSUM, 0, "NEEDS_CSUM without CSUM");
    }
    let need = match gso & 0x7f {
        0 => {
            assert_eq!(gso, 0, "ECN without a GSO type");
            0
        }
        1 => feature::HOST_TSO4,
        4 => feature::HOST_TSO6,
        other => panic!("sent GSO type {other}"),
    };
    assert_eq!(features & need, need, "GSO {gso:#x} not negotiated");
    if gso & 0x80 != 0 {
        assert_ne!(features & feature::HOST_ECN, 0, "ECN not negotiated");
    }
}

fuzz_target!(|data: &[u8]| {
    let case = DeviceCase::decode(data);
    let (tap, peer) = seqpacket_pair();
    let frames = case.extra[0] % 5;
    let len = usize::from(u16::from_le_bytes([case.extra[1], case.extra[2]])) % (MAX_FRAME + 1);
    let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
    for _ in 0..frames {
        // SAFETY: sends from a live buffer of `frame.len()` bytes on a socket we own.
        unsafe {
            libc::send(
                peer.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
    }

    let net = Net::new(
        vec![Tap::from_fd(tap)],
        Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
    )
    .expect("net");
    let mut rig = Rig::new(
        Box::new(net),
        memory::guest_memory(case.image),
        "virtio-net",
    );
    // TX in ring slot 0: the rings a short input reaches first.
    if rig.start(case.features, case.queue_size, &[TX, RX]) {
        for q in [RX, TX] {
            if case.kick & (1 << q) != 0 {
                rig.kick(q);
            }
        }
        rig.wait_idle();
    }
    let features = rig.features();
    drop(rig);

    let mut buf = vec![0u8; MAX_FRAME + 1];
    loop {
        // SAFETY: receives into a live buffer of `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                peer.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            break; // drained, or the device's end is closed
        }
        check_sent(&buf[..n as usize], features);
    }
});
