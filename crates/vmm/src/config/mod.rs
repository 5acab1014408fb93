//! What a VM is made of. The same types serve the command line and (later) the REST API.

mod from_api;
mod parse;
mod size;

use std::path::PathBuf;

pub use from_api::from_api;
pub use parse::{
    parse_console, parse_cpus, parse_disk, parse_memory, parse_net, parse_serial, parse_vsock,
};
pub use size::parse_size;

use crate::arch::cpu_template::CpuTemplate;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpusConfig {
    pub boot: u32,
    /// Features hidden from the guest; None: the host's default (see `host::cpu_template`).
    pub template: Option<CpuTemplate>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot: 1,
            template: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    /// Back guest RAM with a memfd mapped shared (`shared=on`), so another process can map
    /// it. Also implied by any vhost-user device; otherwise RAM is private anonymous memory.
    pub shared: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: 512 << 20,
            shared: false,
        }
    }
}

/// Where COM1's output goes (and, for `Tty`, where its input comes from).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    #[default]
    Tty,
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time is the console (it gets the
    /// output and its bytes are the input). Output is also kept in `log`, size-capped.
    Socket {
        socket: PathBuf,
        log: Option<PathBuf>,
    },
    Off,
}

/// The optional virtio console (`--console off|tty|file=PATH`). With `Tty` its output goes to
/// stdout and the host's stdin goes to it instead of COM1 (only one of them can own stdin).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleConfig {
    /// No virtio console device.
    #[default]
    Off,
    Tty,
    File(PathBuf),
}

/// What a guest reset does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnReboot {
    /// The VMM exits 0, like a VM whose guest powered off.
    #[default]
    Exit,
    /// The VM is rebuilt from scratch and boots again.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmConfig {
    /// `None` boots the embedded probe guest.
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub serial: SerialConfig,
    /// The virtio console (off by default: COM1 is the console).
    pub console: ConsoleConfig,
    pub on_reboot: OnReboot,
    /// Write the ACPI tables built for the guest into this directory.
    pub dump_acpi: Option<PathBuf>,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
    /// A virtio-vsock device with its host side on Unix sockets.
    pub vsock: Option<VsockConfig>,
    /// virtio-blk devices, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices on TAP interfaces, in PCI slot order.
    pub nets: Vec<NetConfig>,
    /// Serve the disks and TAP network cards from device processes of their own over vhost-user
    /// (see `device_processes`); guest RAM is then shared.
    pub device_processes: bool,
}

/// A virtio-blk disk on a raw image (`--disk path=FILE[,readonly=on][,num_queues=N][,id=ID]`),
/// or served by a vhost-user backend (`--disk vhost_user=true,socket=PATH[,num_queues=N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image; empty for a vhost-user disk (the backend opens it).
    pub path: PathBuf,
    pub readonly: bool,
    /// Request queues, 1..=[`MAX_DISK_QUEUES`].
    pub num_queues: u16,
    /// The serial the guest reads (GET_ID), at most 20 bytes; else derived from the path.
    pub id: Option<String>,
    /// The image format; `None` detects it from the file (qcow2 magic, else raw).
    pub format: Option<DiskFormat>,
    /// Served by a vhost-user backend instead of the VMM.
    pub vhost_user: Option<VhostUserConfig>,
}

/// A device whose queues a vhost-user backend process serves (Cloud Hypervisor's
/// `vhost_user=true,socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserConfig {
    /// The backend's listening socket.
    pub socket: PathBuf,
    /// Each queue's maximum size (a power of two up to 256).
    pub queue_size: u16,
}

/// Cloud Hypervisor's default queue sizes.
pub const DISK_QUEUE_SIZE: u16 = 128;
pub const NET_QUEUE_SIZE: u16 = 256;

/// Disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

/// virtio-net on a TAP (`--net tap=NAME[,mac=MAC][,num_queues=N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP interface, opened (or, with `CAP_NET_ADMIN`, created) by name; empty with `fds`
    /// or `vhost_user`.
    pub tap: String,
    /// TAP queues another process opened and passed over the API socket (SCM_RIGHTS), one per
    /// queue pair, as registered by `net::adopt`; used instead of `tap` when not empty.
    pub fds: Vec<i32>,
    /// The guest's MAC; a random locally administered one when `None`.
    pub mac: Option<[u8; 6]>,
    /// Data virtqueues, RX + TX (Cloud Hypervisor's convention): an even number, one TAP queue
    /// per pair, 2..=[`MAX_NET_QUEUES`].
    pub num_queues: u16,
    /// Served by a vhost-user backend instead of a TAP.
    pub vhost_user: Option<VhostUserConfig>,
}

/// The most data queues a network device may have (16 pairs, a thread each).
pub const MAX_NET_QUEUES: u16 = 32;

/// The most queues a disk may have.
pub const MAX_DISK_QUEUES: u16 = 64;

/// virtio-vsock (`--vsock cid=N,socket=PATH`): the guest's CID and the Unix socket the host
/// side listens on (Firecracker's hybrid vsock: guest connections to port P go to `PATH_P`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// At least 3 (0-2 are reserved).
    pub cid: u32,
    pub socket: PathBuf,
}

/// Command line for a user's kernel when none is given.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

impl VmConfig {
    /// Whether guest RAM must be shareable with another process.
    pub fn shared_memory(&self) -> bool {
        self.memory.shared
            || self.device_processes
            || self.disks.iter().any(|d| d.vhost_user.is_some())
            || self.nets.iter().any(|n| n.vhost_user.is_some())
    }

    /// The command line the guest gets.
    pub fn effective_cmdline(&self) -> String {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE.to_string(),
            (None, None) => String::new(),
        }
    }
}
