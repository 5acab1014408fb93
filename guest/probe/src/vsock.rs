//! The `vsock` checks, with `virtio-drivers`' connection manager as the driver:
//! - `vsock`: connects to the host (CID 2) port 1234, sends `hyperpool-probe` and expects the
//!   same bytes back within 2 s.
//! - `vsock-listen`: listens on port 5000, accepts one host connection within 30 s and echoes
//!   what it receives until the host closes it.
//!
//! Everything polls in ring 0 and stays small.

use crate::time;
use crate::virtio::{self, ProbeHal};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use virtio_drivers::device::socket::{
    VMADDR_CID_HOST, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEvent, VsockEventType,
};
use virtio_drivers::transport::pci::PciTransport;

/// Modern (virtio 1.x) virtio-vsock PCI device id (0x1040 + 19).
const VSOCK_MODERN: u16 = 0x1053;
const HOST_PORT: u32 = 1234;
const LOCAL_PORT: u32 = 49152;
const MESSAGE: &[u8] = b"hyperpool-probe";
const TIMEOUT_US: u64 = 2_000_000;
const LISTEN_PORT: u32 = 5000;
const LISTEN_TIMEOUT_US: u64 = 30_000_000;

type Manager = VsockConnectionManager<ProbeHal, PciTransport>;

/// Polls until `want` accepts an event, the connection is reset, or `deadline` passes.
fn wait_event(
    mgr: &mut Manager,
    deadline: u64,
    what: &str,
    mut want: impl FnMut(&mut Manager, &VsockEvent) -> Result<bool, String>,
) -> Result<(), String> {
    loop {
        match mgr.poll() {
            Ok(Some(ev)) => {
                if let VsockEventType::Disconnected { reason } = ev.event_type {
                    return Err(format!("{what}: disconnected ({reason:?})"));
                }
                if want(mgr, &ev)? {
                    return Ok(());
                }
            }
            Ok(None) => core::hint::spin_loop(),
            Err(e) => return Err(format!("{what}: {e}")),
        }
        if time::rdtsc() > deadline {
            return Err(format!("{what}: nothing within {} ms", TIMEOUT_US / 1000));
        }
    }
}

fn echo(mgr: &mut Manager) -> Result<usize, String> {
    let peer = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: HOST_PORT,
    };
    let deadline = time::rdtsc() + time::ticks_for_us(TIMEOUT_US);
    mgr.connect(peer, LOCAL_PORT)
        .map_err(|e| format!("connect: {e}"))?;
    wait_event(mgr, deadline, "connect", |_, ev| {
        Ok(ev.event_type == VsockEventType::Connected)
    })?;
    mgr.send(peer, LOCAL_PORT, MESSAGE)
        .map_err(|e| format!("send: {e}"))?;
    let mut got: Vec<u8> = Vec::new();
    wait_event(mgr, deadline, "echo", |mgr, ev| {
        if let VsockEventType::Received { .. } = ev.event_type {
            let mut buf = [0u8; 64];
            let n = mgr
                .recv(peer, LOCAL_PORT, &mut buf)
                .map_err(|e| format!("recv: {e}"))?;
            got.extend_from_slice(&buf[..n]);
        }
        Ok(got.len() >= MESSAGE.len())
    })?;
    if got != MESSAGE {
        return Err(format!(
            "echo was {:?}",
            String::from_utf8_lossy(&got[..got.len().min(64)])
        ));
    }
    mgr.force_close(peer, LOCAL_PORT)
        .map_err(|e| format!("close: {e}"))?;
    Ok(got.len())
}

/// Brings up the first modern virtio-vsock function of bus 0 and runs `f` on it.
fn with_device(
    rsdp: u64,
    f: impl FnOnce(&mut Manager) -> Result<String, String>,
) -> Result<String, String> {
    let (df, transport) = virtio::open_first(rsdp, VSOCK_MODERN, "vsock")?;
    let socket =
        VirtIOSocket::<ProbeHal, _>::new(transport).map_err(|e| format!("{df} device: {e}"))?;
    let mut mgr = VsockConnectionManager::new(socket);
    let cid = mgr.guest_cid();
    // Dropping the manager resets the device before its queues' memory is freed.
    f(&mut mgr).map_err(|e| format!("{df} cid={cid} {e}"))
}

/// The `vsock` check.
pub fn check(rsdp: u64) -> Result<String, String> {
    with_device(rsdp, |mgr| {
        let cid = mgr.guest_cid();
        let n = echo(mgr)?;
        Ok(format!("cid={cid} echo={n}"))
    })
}

/// The `vsock-listen` check: one host-initiated connection, echoed until the host closes it.
pub fn listen_check(rsdp: u64) -> Result<String, String> {
    with_device(rsdp, |mgr| {
        mgr.listen(LISTEN_PORT);
        let deadline = time::rdtsc() + time::ticks_for_us(LISTEN_TIMEOUT_US);
        let mut peer = None;
        wait_event(mgr, deadline, "accept", |_, ev| {
            if ev.event_type == VsockEventType::ConnectionRequest {
                peer = Some(ev.source);
            }
            Ok(peer.is_some())
        })?;
        let peer = peer.ok_or("accept: no peer")?;
        let mut echoed = 0usize;
        loop {
            let ev = match mgr.poll() {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    if time::rdtsc() > deadline {
                        return Err(format!("echo: host still connected after {echoed} bytes"));
                    }
                    core::hint::spin_loop();
                    continue;
                }
                Err(e) => return Err(format!("echo: {e}")),
            };
            match ev.event_type {
                VsockEventType::Received { .. } => {
                    let mut buf = [0u8; 256];
                    let n = mgr
                        .recv(peer, LISTEN_PORT, &mut buf)
                        .map_err(|e| format!("recv: {e}"))?;
                    mgr.send(peer, LISTEN_PORT, &buf[..n])
                        .map_err(|e| format!("send: {e}"))?;
                    echoed += n;
                }
                VsockEventType::Disconnected { .. } => break,
                _ => {}
            }
        }
        Ok(format!(
            "port={LISTEN_PORT} host_port={} echoed={echoed}",
            peer.port
        ))
    })
}
