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

/// `hyperpool vmm ...` on its own: the pool daemon starts one VMM process per VM, and building
/// the parser of every subcommand (their arguments, value parsers and help) took a measurable
/// share of such a start. The same name, flags and help as [`Cli`]'s `vmm`.
#[derive(Parser)]
#[command(name = "hyperpool", version, about = "A hypervisor on Linux KVM")]
pub struct VmmCli {
    /// More log output (-v debug, -vv trace); HYPERPOOL_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: VmmOnly,
}

#[derive(Subcommand)]
pub enum VmmOnly {
    /// Run one VM process driven over Cloud Hypervisor's REST API on a Unix socket.
    Vmm(VmmArgs),
}

impl VmmCli {
    /// Whether the command line asks for `vmm` as its first word (how the daemon starts it);
    /// anything else goes to the full [`Cli`].
    pub fn applies() -> bool {
        std::env::args_os().nth(1).is_some_and(|a| a == "vmm")
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one VM in the foreground; without --kernel, the built-in probe guest.
    Run(Box<RunArgs>),
    /// Run one VM process driven over Cloud Hypervisor's REST API on a Unix socket.
    Vmm(VmmArgs),
    /// Run the pool daemon: one VMM process per VM, state in DIR, REST API on a Unix socket.
    Serve(ServeArgs),
    /// Define a VM in the pool (and start it with --start).
    Create(Box<CreateArgs>),
    /// Start a defined VM.
    Start(VmRef),
    /// Stop a VM: ACPI power button, then forced after the daemon's stop timeout.
    Stop(VmRef),
    /// End a VM's VMM process at once.
    Kill(VmRef),
    /// Pause a VM's vCPUs.
    Pause(VmRef),
    /// Resume a paused VM.
    Resume(VmRef),
    /// Reboot a running VM.
    Restart(VmRef),
    /// Remove a stopped VM and its files.
    Rm(VmRef),
    /// List the pool's VMs.
    Ls(ClientArgs),
    /// Show a VM with live figures.
    Inspect(VmRef),
    /// Attach to a running VM's serial console (detach with Ctrl-]).
    Console(VmRef),
    /// Print a VM's console log.
    Logs(LogsArgs),
    /// Show the host's capacity and what the VMs use.
    Pool(ClientArgs),
    /// Build guest images.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Serve one device to a vhost-user frontend (QEMU, a VMM) from this sandboxed process.
    #[command(subcommand)]
    Device(DeviceCommand),
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
    /// Guest RAM: SIZE or size=SIZE[,shared=on] (e.g. 512M, 4G); shared (a memfd other
    /// processes can map) is implied by vhost-user devices.
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
    /// Serve the disks and TAP network cards from sandboxed device processes of their own
    /// (`hyperpool device`, over vhost-user) instead of inside the VMM.
    #[arg(long)]
    pub device_processes: bool,
    /// A virtio-vsock device: cid=N,socket=PATH (host side on Unix sockets, Firecracker's
    /// hybrid convention).
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-blk disk on a raw image: path=FILE[,readonly=on][,num_queues=N][,id=ID], or
    /// served by a vhost-user backend: vhost_user=true,socket=PATH[,num_queues=N][,queue_size=N]
    /// (repeatable).
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-net device on a TAP interface: tap=NAME[,mac=MAC][,num_queues=N] (repeatable;
    /// the TAP is created if it does not exist and we may; N even, 2 per queue pair, default 2),
    /// or served by a vhost-user backend: vhost_user=true,socket=PATH[,mac=MAC][,num_queues=N].
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
}

#[derive(Args)]
pub struct VmmArgs {
    /// The Unix socket to serve the API on (PATH or path=PATH); created with mode 0600.
    #[arg(long, value_name = "PATH")]
    pub api_socket: String,
    /// Serve on the listening socket inherited as file descriptor N, already bound to
    /// --api-socket (the pool daemon binds it, so its first request needs no waiting).
    #[arg(long, value_name = "N")]
    pub api_fd: Option<i32>,
}

#[derive(Args)]
pub struct ServeArgs {
    /// The API's Unix socket (mode 0600).
    #[arg(long, env = "HYPERPOOL_SOCKET", default_value = "/run/hyperpool.sock")]
    pub socket: PathBuf,
    /// Where VM state, logs and disk overlays live.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/hyperpool")]
    pub state_dir: PathBuf,
    /// Also serve the API on TCP at ADDR (e.g. 127.0.0.1:8700); needs --token-file.
    #[arg(long, value_name = "ADDR", requires = "token_file")]
    pub listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token TCP clients must send.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// vCPUs the pool may hand out per host core.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Guest memory the pool may hand out per byte of host memory.
    #[arg(long, default_value_t = 1.0)]
    pub memory_overcommit: f64,
    /// Seconds a guest gets to power off after the power button before it is stopped by force.
    #[arg(long, default_value_t = 30)]
    pub stop_timeout: u64,
}

#[derive(Args, Clone)]
pub struct ClientArgs {
    /// The daemon's socket.
    #[arg(long, env = "HYPERPOOL_SOCKET", default_value = "/run/hyperpool.sock")]
    pub socket: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VmRef {
    /// The VM's name.
    pub name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The VM's name.
    pub name: String,
    /// Only the last N bytes.
    #[arg(long, value_name = "N")]
    pub bytes: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct CreateArgs {
    /// The VM's name (a-z, 0-9, '-', '_').
    pub name: Option<String>,
    /// A VM spec file (JSON or TOML, the pool API's VmSpec); flags given too override it.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// Start it right away.
    #[arg(long)]
    pub start: bool,
    /// Kernel to boot; without one, the built-in probe guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    #[arg(long, value_name = "TEXT")]
    pub cmdline: Option<String>,
    /// vCPUs: N or boot=N[,features=-cx16,-xsave].
    #[arg(long, value_name = "SPEC", value_parser = parse_cpus)]
    pub cpus: Option<CpusConfig>,
    /// Guest RAM: SIZE or size=SIZE (e.g. 512M).
    #[arg(long, value_name = "SPEC", value_parser = parse_memory)]
    pub memory: Option<MemoryConfig>,
    /// A disk: path=FILE[,readonly=on][,num_queues=N][,id=SERIAL][,format=raw|qcow2], or
    /// base=FILE for a copy-on-write overlay of FILE (repeatable).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// virtio-net on a TAP: tap=NAME[,mac=MAC][,num_queues=N] (repeatable).
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    pub nets: Vec<NetConfig>,
    /// virtio-vsock: cid=N,socket=PATH.
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    pub vsock: Option<VsockConfig>,
    /// Add a virtio-rng device.
    #[arg(long)]
    pub rng: bool,
    /// Serve the disks and TAP network cards from sandboxed device processes of their own.
    #[arg(long)]
    pub device_processes: bool,
    /// What the daemon does when the VM ends by itself.
    #[arg(long, value_enum)]
    pub restart: Option<RestartArg>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RestartArg {
    Never,
    OnFailure,
    Always,
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

/// The vhost-user socket a device backend listens on (one frontend at a time).
#[derive(Args)]
pub struct SocketArg {
    /// Unix socket to listen on (a stale one is replaced; mode 0600).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Close the device and exit when this inherited fd (a pipe's read end) reads end-of-file:
    /// how a VMM that started this process takes it along when it goes, even by SIGKILL.
    #[arg(long, value_name = "FD")]
    pub exit_with_fd: Option<i32>,
}

#[derive(Subcommand)]
pub enum DeviceCommand {
    /// virtio-blk on a raw or qcow2 image.
    Blk {
        #[command(flatten)]
        socket: SocketArg,
        /// path=FILE[,readonly=on][,num_queues=N][,id=ID][,format=raw|qcow2]
        #[arg(long, value_name = "SPEC", value_parser = parse_disk)]
        disk: DiskConfig,
    },
    /// virtio-net on a TAP interface.
    Net {
        #[command(flatten)]
        socket: SocketArg,
        /// tap=NAME[,mac=MAC][,num_queues=N]
        #[arg(long, value_name = "SPEC", value_parser = parse_net)]
        net: NetConfig,
    },
    /// virtio-vsock on host Unix sockets.
    Vsock {
        #[command(flatten)]
        socket: SocketArg,
        /// cid=N,socket=PATH
        #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
        vsock: VsockConfig,
    },
    /// virtio-rng from the host's getrandom.
    Rng {
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, VmmCli};

    /// The short-cut parser must accept, refuse and document `vmm` exactly as the full one does.
    #[test]
    fn vmm_cli_is_the_full_clis_vmm() {
        let help = |mut c: clap::Command| {
            c.build();
            let mut vmm = c.find_subcommand("vmm").unwrap().clone();
            vmm.render_long_help().to_string()
        };
        assert_eq!(help(VmmCli::command()), help(Cli::command()));
        for args in [
            &[
                "hyperpool",
                "vmm",
                "--api-socket",
                "/x.sock",
                "--api-fd",
                "3",
            ][..],
            &["hyperpool", "vmm", "-vv", "--api-socket", "path=/x.sock"],
            &["hyperpool", "vmm"],
            &[
                "hyperpool",
                "vmm",
                "--api-fd",
                "x",
                "--api-socket",
                "/x.sock",
            ],
            &["hyperpool", "vmm", "--nope"],
        ] {
            let full = Cli::try_parse_from(args);
            let short = VmmCli::try_parse_from(args);
            match (full, short) {
                (Ok(f), Ok(s)) => {
                    let super::Command::Vmm(fa) = f.command else {
                        panic!("{args:?}: not vmm")
                    };
                    let super::VmmOnly::Vmm(sa) = s.command;
                    assert_eq!(f.verbose, s.verbose, "{args:?}");
                    assert_eq!((fa.api_socket, fa.api_fd), (sa.api_socket, sa.api_fd));
                }
                (Err(f), Err(s)) => {
                    assert_eq!(f.kind(), s.kind(), "{args:?}");
                    assert_eq!(f.to_string(), s.to_string(), "{args:?}");
                }
                (f, s) => panic!("{args:?}: full {:?}, short {:?}", f.is_ok(), s.is_ok()),
            }
        }
    }
}
