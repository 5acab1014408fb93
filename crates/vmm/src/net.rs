//! Opening the VM's network devices: every TAP is opened (created, when we may) before any
//! device exists, so a TAP that cannot be opened, or one named twice, stops the VM before the
//! guest starts.
//!
//! The TAP fds are kept for the life of the process: a VM rebuilt by `--on-reboot restart` gets
//! the same interfaces back (a TAP we created would otherwise vanish with its last fd, and with
//! it the host side's addresses), and the same MAC (a random one is drawn once).

use std::collections::HashSet;
use std::sync::Mutex;

use hyperpool_devices::virtio::Net;
use hyperpool_devices::virtio::net::Tap;
use hyperpool_devices::virtio::net::device::random_mac;

use crate::config::NetConfig;
use crate::error::{Error, Result};

/// TAPs opened so far, by name, with the MAC their device got.
static TAPS: Mutex<Vec<(String, Tap, [u8; 6])>> = Mutex::new(Vec::new());

fn tap(name: &str, mac: Option<[u8; 6]>) -> std::io::Result<(Tap, [u8; 6])> {
    let mut taps = TAPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t, m)) = taps.iter().find(|(n, _, _)| n == name) {
        return Ok((t.try_clone()?, mac.unwrap_or(*m)));
    }
    let mac = match mac {
        Some(m) => m,
        None => random_mac()?,
    };
    let t = Tap::open(name)?;
    taps.push((name.to_owned(), t.try_clone()?, mac));
    Ok((t, mac))
}

pub(crate) fn open_all(nets: &[NetConfig]) -> Result<Vec<Net>> {
    let mut names = HashSet::new();
    for n in nets {
        if !names.insert(n.tap.as_str()) {
            return Err(Error::Config(format!(
                "--net: TAP '{}' is used by more than one --net",
                n.tap
            )));
        }
    }
    nets.iter().map(open).collect()
}

fn open(cfg: &NetConfig) -> Result<Net> {
    let (tap, mac) = tap(&cfg.tap, cfg.mac)
        .map_err(|e| Error::Config(format!("--net tap={}: cannot open the TAP: {e}", cfg.tap)))?;
    let net = Net::new(tap, Some(mac))
        .map_err(|e| Error::Config(format!("--net tap={}: {e}", cfg.tap)))?;
    let m = net.mac();
    tracing::info!(
        "virtio-net on TAP {} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        cfg.tap,
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    Ok(net)
}
