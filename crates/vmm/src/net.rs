//! Opening the VM's network devices: every TAP is opened (created, when we may) before any
//! device exists, so a TAP that cannot be opened, or one named twice, stops the VM before the
//! guest starts.
//!
//! The TAP fds are kept for the life of the process: a VM rebuilt by `--on-reboot restart` gets
//! the same interfaces back (a TAP we created would otherwise vanish with its last fd, and with
//! it the host side's addresses), and the same MAC (a random one is drawn once). With
//! `num_queues=2N` (N > 1) the TAP is opened N times as a multi-queue TAP, one fd per pair.
//!
//! TAP queues passed over the API socket (SCM_RIGHTS, `fds`) are registered by [`adopt`] under
//! their number in this process, and each device gets duplicates: the registered fds, too, live
//! until the VM configuration that names them goes ([`release`]).

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use hyperpool_devices::virtio::Net;
use hyperpool_devices::virtio::net::Tap;
use hyperpool_devices::virtio::net::device::random_mac;

use crate::config::NetConfig;
use crate::error::{Error, Result};
use crate::vhost_user::Opened;

/// A TAP opened by this process: its name, its queues (one per pair), the MAC its device got.
type OpenTap = (String, Vec<Tap>, [u8; 6]);

/// TAPs opened so far.
static TAPS: Mutex<Vec<OpenTap>> = Mutex::new(Vec::new());
/// TAP queues received over the API, by their number in this process.
static ADOPTED: Mutex<BTreeMap<i32, OwnedFd>> = Mutex::new(BTreeMap::new());

/// Keeps fds received with an API request for `fds` entries; returns their numbers.
pub fn adopt(fds: Vec<OwnedFd>) -> Vec<i32> {
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    fds.into_iter()
        .map(|fd| {
            let raw = fd.as_raw_fd();
            adopted.insert(raw, fd);
            raw
        })
        .collect()
}

/// Closes adopted fds no configuration names any more.
pub fn release(raws: &[i32]) {
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    for raw in raws {
        adopted.remove(raw);
    }
}

/// Duplicates of the adopted fds `raws`, as TAP queues.
fn adopted_taps(raws: &[i32]) -> std::result::Result<Vec<Tap>, String> {
    let adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    raws.iter()
        .map(|raw| {
            let fd = adopted
                .get(raw)
                .ok_or_else(|| format!("fd {raw} did not come with an API request"))?;
            let dup = fd.try_clone().map_err(|e| format!("fd {raw}: {e}"))?;
            Tap::from_tap_fd(dup).map_err(|e| format!("fd {raw}: {e}"))
        })
        .collect()
}

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

pub(crate) fn open_all(nets: &[NetConfig]) -> Result<Vec<Opened>> {
    let mut names = HashSet::new();
    for n in nets
        .iter()
        .filter(|n| n.fds.is_empty() && n.vhost_user.is_none())
    {
        if !names.insert(n.tap.as_str()) {
            return Err(Error::Config(format!(
                "--net: TAP '{}' is used by more than one --net",
                n.tap
            )));
        }
    }
    nets.iter().map(open).collect()
}

/// Opens one network device's TAP, or connects its vhost-user backend; the error is one line
/// naming it.
pub(crate) fn open(cfg: &NetConfig) -> Result<Opened> {
    if let Some(vu) = &cfg.vhost_user {
        return crate::vhost_user::open_net(cfg, vu);
    }
    let net = open_tap(cfg)?;
    let counters = net.counters();
    Ok((Box::new(net), counters))
}

/// Opens a network device's TAP (or its passed fds) as a virtio-net device model (also what
/// `hyperpool device net` serves out of process).
pub fn open_tap(cfg: &NetConfig) -> Result<Net> {
    let pairs = usize::from(cfg.num_queues / 2);
    if !cfg.fds.is_empty() {
        let taps = adopted_taps(&cfg.fds).map_err(|e| Error::Config(format!("--net fds: {e}")))?;
        let mac = match cfg.mac {
            Some(m) => m,
            None => random_mac().map_err(Error::io("drawing a MAC address"))?,
        };
        let name = taps
            .first()
            .map(|t| t.name().to_owned())
            .unwrap_or_default();
        tracing::info!("virtio-net on passed fds {:?} (TAP {name})", cfg.fds);
        return Net::new(taps, Some(mac))
            .map_err(|e| Error::Config(format!("--net fds (TAP {name}): {e}")));
    }
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
