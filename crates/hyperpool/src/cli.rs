//! The command line, in Cloud Hypervisor's grammar for VM options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hyperpool_vmm::config::{
    ConsoleConfig, CpusConfig, DiskConfig, MemoryConfig, NetConfig, SerialConfig, VsockConfig,
    parse_console, parse_cpus, parse_disk, parse_memory, parse_net, parse_serial, parse_vsock,
};

#[derive(Parser)]
#[command(name = "hyperpool", version, about = "A hypervisor on Linux KVM")]
pub struct Cli {
    /// More log output (-v debug, -vv trace); HYPERPOOL_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one VM in the foreground; without --kernel, the built-in probe guest.
    Run(Box<RunArgs>),
    /// Run one VM process driven over Cloud Hypervisor's REST API on a Unix socket.
    Vmm(VmmArgs),
    /// Build guest images.
    #[command(subcommand)]
    Guest(GuestCommand),
}

#[derive(Args)]
pub struct RunArgs {
    /// Kernel to boot: ELF with a PVH note, bzImage, 64-bit vmlinux, or Multiboot image.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk handed to the kernel.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// vCPUs: N or boot=N[,features=-cx16,-xsave].
    #[arg(long, value_name = "SPEC", value_parser = parse_cpus, default_value = "boot=1")]
    pub cpus: CpusConfig,
    /// Guest RAM: SIZE or size=SIZE (e.g. 512M, 4G).
    #[arg(long, value_name = "SPEC", value_parser = parse_memory, default_value = "size=512M")]
    pub memory: MemoryConfig,
    /// Where COM1 goes: tty, off, or file=PATH.
    #[arg(long, value_name = "SPEC", value_parser = parse_serial, default_value = "tty")]
    pub serial: SerialConfig,
    /// A virtio console: off, tty, or file=PATH. With tty, stdin goes to it instead of COM1.
    #[arg(long, value_name = "SPEC", value_parser = parse_console, default_value = "off")]
    pub console: ConsoleConfig,
    /// What a guest reboot does.
    #[arg(long, value_enum, default_value_t = OnRebootArg::Exit)]
    pub on_reboot: OnRebootArg,
    /// Write the ACPI tables built for the guest into DIR.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,
    /// Add a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    pub rng: bool,
    /// A virtio-vsock device: cid=N,socket=PATH (host side on Unix sockets, Firecracker's
    /// hybrid convention).
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-blk disk on a raw image: path=FILE[,readonly=on][,num_queues=N][,id=ID]
    /// (repeatable).
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net device on a TAP interface: tap=NAME[,mac=MAC][,num_queues=N] (repeatable;
    /// the TAP is created if it does not exist and we may; N even, 2 per queue pair, default 2).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
}

#[derive(Args)]
pub struct VmmArgs {
    /// The Unix socket to serve the API on (PATH or path=PATH); created with mode 0600.
    #[arg(long, value_name = "PATH")]
    pub api_socket: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnRebootArg {
    /// Exit 0, as after a poweroff.
    Exit,
    /// Boot the VM again from scratch.
    Restart,
}

#[derive(Subcommand)]
pub enum GuestCommand {
    /// Write the built-in guests (probe.elf, tiny.elf, tiny-idle.elf, tiny-multiboot.elf) into DIR, e.g. to boot
    /// them under another VMM.
    Probe {
        /// Output directory.
        dir: PathBuf,
    },
    /// Build a Debian kernel and busybox initramfs (for hardware-KVM hosts) into DIR.
    Debian {
        /// Output directory.
        dir: PathBuf,
    },
}
