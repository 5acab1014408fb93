//! vhost-user device backends for the TCG tests, each a process serving one socket. The tests
//! take the backend as a parameter, so every check runs against each implementation listed in
//! [`BlkBackend::ALL`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A disk image as the backend should open it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    /// A qcow2 file, with its backing file (if any) named in its header.
    Qcow2,
}

/// Who serves `vhost-user-blk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkBackend {
    /// QEMU's own, independent implementation (`qemu-storage-daemon`).
    QemuStorageDaemon,
    /// Ours: `hyperpool device blk`.
    Hyperpool,
}

impl BlkBackend {
    pub const ALL: &'static [BlkBackend] = &[BlkBackend::QemuStorageDaemon, BlkBackend::Hyperpool];

    pub fn name(self) -> &'static str {
        match self {
            Self::QemuStorageDaemon => "qemu-storage-daemon",
            Self::Hyperpool => "hyperpool-device-blk",
        }
    }

    /// The program this backend needs, or None (skip) if it is missing, a failure under CI=true.
    pub fn available(self) -> bool {
        let program = match self {
            Self::QemuStorageDaemon => "qemu-storage-daemon",
            Self::Hyperpool => return true,
        };
        let ok = Command::new(program)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{program} is missing on a CI machine (scripts/setup-host.sh installs it)"
            );
            eprintln!("skipping: {program} is missing");
        }
        ok
    }

    /// Starts serving `image` on a new socket in `dir`; returns once the socket is there.
    pub fn spawn(
        self,
        dir: &Path,
        image: &Path,
        format: ImageFormat,
        readonly: bool,
    ) -> BackendProcess {
        let socket = dir.join(format!("{}.sock", self.name()));
        let cmd = match self {
            Self::QemuStorageDaemon => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=f,filename={}{}",
                    image.display(),
                    if readonly { ",read-only=on" } else { "" }
                ));
                let node = match format {
                    ImageFormat::Raw => "f",
                    ImageFormat::Qcow2 => {
                        c.args(["--blockdev", "driver=qcow2,node-name=q,file=f"]);
                        "q"
                    }
                };
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable={}",
                    socket.display(),
                    if readonly { "off" } else { "on" }
                ));
                c
            }
            Self::Hyperpool => {
                let mut c = Command::new(super::hyperpool());
                c.args(["device", "blk", "--socket"]).arg(&socket);
                c.arg("--disk").arg(format!(
                    "path={}{}{}",
                    image.display(),
                    if readonly { ",readonly=on" } else { "" },
                    if format == ImageFormat::Qcow2 {
                        ",format=qcow2"
                    } else {
                        ""
                    }
                ));
                c
            }
        };
        BackendProcess::start(cmd, socket, self.name())
    }
}

/// A running backend, killed on drop.
pub struct BackendProcess {
    child: Child,
    pub socket: PathBuf,
    name: &'static str,
}

impl BackendProcess {
    /// Runs `cmd`, a backend that will listen on `socket`; returns once the socket is there.
    pub fn start(mut cmd: Command, socket: PathBuf, name: &'static str) -> Self {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut backend = BackendProcess {
            child,
            socket,
            name,
        };
        backend.wait_for_socket(Duration::from_secs(20));
        backend
    }

    fn wait_for_socket(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.socket.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{} exited ({status}) before listening: {err}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not create {} within {limit:?}",
                self.name,
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// QEMU arguments for a `vhost-user-blk-pci` device on this socket.
    pub fn blk_device_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            format!("socket,id=vub,path={}", self.socket.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=vub,num-queues=1".into(),
        ]
    }

    /// Stops the backend (so it has flushed and closed the image) before the host looks at it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Who serves the guest's virtio-net on a TAP in the test's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetBackend {
    /// QEMU's built-in TAP netdev: the reference the vhost-user-net backends are held to.
    QemuTap,
    /// Ours: `hyperpool device net` on the TAP, QEMU's `-netdev vhost-user`.
    Hyperpool,
}

impl NetBackend {
    pub const ALL: &'static [NetBackend] = &[NetBackend::QemuTap, NetBackend::Hyperpool];

    pub fn name(self) -> &'static str {
        match self {
            Self::QemuTap => "qemu-tap",
            Self::Hyperpool => "hyperpool-device-net",
        }
    }

    /// QEMU arguments for a `virtio-net-pci` device with MAC `mac` on `tap` (which exists in
    /// the namespace `ns`, where QEMU runs too), and the backend process if the backend is one
    /// (its socket in `dir`).
    pub fn attach(
        self,
        tap: &str,
        mac: &str,
        ns: &super::netns::Netns,
        dir: &Path,
    ) -> (Option<BackendProcess>, Vec<String>) {
        match self {
            Self::Hyperpool => {
                let socket = dir.join("net.sock");
                let mut cmd = ns.exec(super::hyperpool().to_str().unwrap());
                cmd.args(["device", "net", "--socket"]).arg(&socket);
                cmd.arg("--net").arg(format!("tap={tap},mac={mac}"));
                let backend = BackendProcess::start(cmd, socket.clone(), self.name());
                (
                    Some(backend),
                    vec![
                        "-chardev".into(),
                        format!("socket,id=vun,path={}", socket.display()),
                        "-netdev".into(),
                        "vhost-user,id=n0,chardev=vun".into(),
                        // INTx, not MSI-X: for a vhost-user netdev QEMU turns guest-notifier
                        // masking off and then unmasks MSI-X vectors through KVM irqfds, which
                        // TCG does not have (QEMU 7.2 segfaults in vhost_net_start ->
                        // msix_set_vector_notifiers as the driver starts the device).
                        "-device".into(),
                        format!("virtio-net-pci,netdev=n0,mac={mac},vectors=0"),
                    ],
                )
            }
            Self::QemuTap => (
                None,
                vec![
                    "-netdev".into(),
                    format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                    "-device".into(),
                    format!("virtio-net-pci,netdev=n0,mac={mac}"),
                ],
            ),
        }
    }
}

/// Who serves the guest's virtio-rng.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RngBackend {
    /// QEMU's built-in virtio-rng on the host's /dev/urandom: the reference the vhost-user-rng
    /// backends are held to.
    QemuBuiltin,
    /// Ours: `hyperpool device rng`, QEMU's `vhost-user-rng-pci`.
    Hyperpool,
}

impl RngBackend {
    pub const ALL: &'static [RngBackend] = &[RngBackend::QemuBuiltin, RngBackend::Hyperpool];

    pub fn name(self) -> &'static str {
        match self {
            Self::QemuBuiltin => "qemu-virtio-rng",
            Self::Hyperpool => "hyperpool-device-rng",
        }
    }

    /// QEMU arguments for the device, and the backend process if the backend is one (its
    /// socket in `dir`).
    pub fn attach(self, dir: &Path) -> (Option<BackendProcess>, Vec<String>) {
        match self {
            Self::Hyperpool => {
                let socket = dir.join("rng.sock");
                let mut cmd = Command::new(super::hyperpool());
                cmd.args(["device", "rng", "--socket"]).arg(&socket);
                let backend = BackendProcess::start(cmd, socket.clone(), self.name());
                (
                    Some(backend),
                    vec![
                        "-chardev".into(),
                        format!("socket,id=vur,path={}", socket.display()),
                        "-device".into(),
                        "vhost-user-rng-pci,chardev=vur".into(),
                    ],
                )
            }
            Self::QemuBuiltin => (
                None,
                vec![
                    "-object".into(),
                    "rng-random,id=rng0,filename=/dev/urandom".into(),
                    "-device".into(),
                    "virtio-rng-pci,rng=rng0".into(),
                ],
            ),
        }
    }
}
