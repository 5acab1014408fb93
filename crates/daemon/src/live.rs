//! A running VM's live figures for `inspect`: its VMM's counters (over the VMM's API) and what
//! the kernel knows of the process. Gathered by the API server, not the controller, so that
//! inspecting many VMs at once waits on many VMMs at once, and no other action waits at all.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyperpool_api::pool::LiveFigures;

use crate::vmm_process;

/// Where a running VM's figures come from, as the controller knew it at the inspect.
#[derive(Debug, Clone)]
pub struct LiveSource {
    pub pid: u32,
    pub socket: PathBuf,
    /// Exits counted at the previous inspect, for the rate.
    pub previous: Option<(Instant, u64)>,
    pub started_at_ms: Option<u64>,
}

impl LiveSource {
    /// Asks the VMM and the kernel (blocking); returns the figures and the exit count seen now,
    /// the next inspect's `previous`.
    pub fn collect(self) -> (LiveFigures, (Instant, u64)) {
        let counters: hyperpool_api::VmCounters = vmm_process::get(&self.socket, "vm.counters")
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let exits: u64 = counters
            .iter()
            .filter(|(k, _)| k.starts_with("vcpu"))
            .filter_map(|(_, c)| c.get("exits"))
            .sum();
        let now = Instant::now();
        let rate = match self.previous {
            Some((t, before)) if now > t => {
                exits.saturating_sub(before) as f64 / now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        let (cpu_time_ms, rss) = vmm_process::process_figures(self.pid).unwrap_or((0, 0));
        let resident_guest_bytes = counters
            .get("vm")
            .and_then(|vm| vm.get("memory_resident_bytes"))
            .copied()
            .unwrap_or(0);
        let devices = counters
            .into_iter()
            .filter(|(k, _)| !k.starts_with("vcpu") && k != "vm")
            .collect();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let live = LiveFigures {
            uptime_ms: self.started_at_ms.map_or(0, |t| now_ms.saturating_sub(t)),
            cpu_time_ms,
            resident_guest_bytes,
            vmm_rss_bytes: rss,
            vm_exits: exits,
            vm_exits_per_sec: rate,
            devices,
        };
        (live, (now, exits))
    }
}
