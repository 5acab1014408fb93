//! The pool daemon's API (`hyperpool serve`): VM specs, their records, and the pool's capacity.
//! Described for clients in `docs/pool-api.yaml`.

use serde::{Deserialize, Serialize};

/// What a VM is to be: everything `hyperpool create` takes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub cpus: u32,
    /// Hyperpool's CPU template, e.g. `-cx16,-xsave`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_features: Option<String>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// `None` boots the built-in probe guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSpec>,
    #[serde(default)]
    pub rng: bool,
    /// The VM's disks and TAP network cards served by sandboxed device processes of their own
    /// (vhost-user) rather than inside its VMM.
    #[serde(default)]
    pub device_processes: bool,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

fn one() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    512
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// An image the VM uses directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A base image the VM gets its own qcow2 overlay on (copy-on-write; the base is untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// `raw` or `qcow2` for `path`; detected when absent (a detected qcow2 may not have a
    /// backing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// The serial the guest reads (GET_ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    pub cid: u32,
    pub socket: String,
}

/// Where a VM's vCPUs may run and how much of the host they get.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Host cores the VM's threads are pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_cores: Option<Vec<usize>>,
    /// Relative CPU weight against other VMs (cgroup `cpu.weight`, 1..=10000; default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// At most this many cores' worth of CPU time (cgroup `cpu.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// A VM that ends stays stopped (or crashed).
    #[default]
    Never,
    /// Restarted when its VMM dies or the guest crashes, not after a clean power-off.
    OnFailure,
    /// Restarted whenever it ends without being stopped through the API.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmStatus {
    /// Defined, never started (or stopped through the API).
    Stopped,
    Running,
    Paused,
    /// The VMM process died or the guest crashed.
    Crashed,
}

/// A VM as the pool knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub status: VmStatus,
    /// The VMM process while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Unix time (ms) of the last start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    /// Why it last ended, if it did on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    pub restarts: u32,
}

/// `inspect`: the record plus what the running VM is doing now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDetails {
    #[serde(flatten)]
    pub record: VmRecord,
    /// The running VM's serial console (a Unix socket on the daemon's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveFigures>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveFigures {
    pub uptime_ms: u64,
    /// CPU time of the VMM process (vCPUs and devices), ms.
    pub cpu_time_ms: u64,
    /// Guest memory the host has actually backed, bytes.
    pub resident_guest_bytes: u64,
    pub vmm_rss_bytes: u64,
    pub vm_exits: u64,
    /// Exits per second since the previous `inspect` of this VM (0 on the first).
    pub vm_exits_per_sec: f64,
    /// Per-device I/O figures from `vm.counters` (bytes and requests), by device.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub devices: crate::VmCounters,
}

/// The host's capacity and what the VMs have been given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub host_cores: u32,
    pub host_memory_mib: u64,
    pub disk_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// vCPUs of running and paused VMs.
    pub allocated_vcpus: u32,
    pub allocated_memory_mib: u64,
    /// What a new VM may still get: capacity × overcommit − allocated.
    pub free_vcpus: u32,
    pub free_memory_mib: u64,
    pub vms: u32,
    pub running: u32,
}

/// An error from the pool API: the one line the CLI prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
