//! Opening the VM's network devices: every TAP is opened (created, when we may) before any
//! device exists, so a TAP that cannot be opened, or one named twice, stops the VM before the
//! guest starts.
//!
//! The TAP fds are kept for the life of the process: a VM rebuilt by `--on-reboot restart` gets
//! the same interfaces back (a TAP we created would otherwise vanish with its last fd, and with
//! it the host side's addresses), and the same MAC (a random one is drawn once). With
//! `num_queues=2N` (N > 1) the TAP is opened N times as a multi-queue TAP, one fd per pair.

use std::collections::HashSet;
use std::sync::Mutex;

use hyperpool_devices::virtio::Net;
use hyperpool_devices::virtio::net::Tap;
use hyperpool_devices::virtio::net::device::random_mac;

use crate::config::NetConfig;
use crate::error::{Error, Result};

/// A TAP opened by this process: its name, its queues (one per pair), the MAC its device got.
type OpenTap = (String, Vec<Tap>, [u8; 6]);

/// TAPs opened so far.
static TAPS: Mutex<Vec<OpenTap>> = Mutex::new(Vec::new());

fn clone_all(taps: &[Tap]) -> std::io::Result<Vec<Tap>> {
    taps.iter().map(Tap::try_clone).collect()
}

fn tap(name: &str, pairs: usize, mac: Option<[u8; 6]>) -> std::io::Result<(Vec<Tap>, [u8; 6])> {
    let mut taps = TAPS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t, m)) = taps.iter().find(|(n, _, _)| n == name) {
        return Ok((clone_all(t)?, mac.unwrap_or(*m)));
    }
    let mac = match mac {
        Some(m) => m,
        None => random_mac()?,
    };
    let t = Tap::open_queues(name, pairs)?;
    taps.push((name.to_owned(), clone_all(&t)?, mac));
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

/// Opens one network device's TAP; the error is one line naming it.
pub(crate) fn open(cfg: &NetConfig) -> Result<Net> {
    let pairs = usize::from(cfg.num_queues / 2);
    let (taps, mac) = tap(&cfg.tap, pairs, cfg.mac)
        .map_err(|e| Error::Config(format!("--net tap={}: cannot open the TAP: {e}", cfg.tap)))?;
    let net = Net::new(taps, Some(mac))
        .map_err(|e| Error::Config(format!("--net tap={}: {e}", cfg.tap)))?;
    let m = net.mac();
    tracing::info!(
        "virtio-net on TAP {} ({pairs} queue pair{}) mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        cfg.tap,
        if pairs == 1 { "" } else { "s" },
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    Ok(net)
}
