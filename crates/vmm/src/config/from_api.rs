//! The per-VM REST API's `VmConfig` (Cloud Hypervisor's schema) turned into a [`VmConfig`], with
//! the same checks and messages as the command line.

use std::path::PathBuf;

use hyperpool_api as api;

use super::parse::{disk_queues, disk_serial, net_queues, parse_mac};
use super::{
    ConsoleConfig, CpusConfig, DISK_QUEUE_SIZE, DiskConfig, DiskFormat, MemoryConfig,
    NET_QUEUE_SIZE, NetConfig, OnReboot, SerialConfig, VhostUserConfig, VmConfig, VsockConfig,
};
use crate::arch::cpu_template::CpuTemplate;

/// Converts an API config; the error is one line naming the field.
pub fn from_api(cfg: &api::VmConfig) -> Result<VmConfig, String> {
    cfg.check().map_err(|e| e.to_string())?;
    let mut out = VmConfig {
        kernel: cfg.payload.kernel.as_ref().map(PathBuf::from),
        initramfs: cfg.payload.initramfs.as_ref().map(PathBuf::from),
        cmdline: cfg.payload.cmdline.clone(),
        // A guest reset reboots the VM, as in Cloud Hypervisor.
        on_reboot: OnReboot::Restart,
        device_processes: cfg.x_device_processes,
        ..VmConfig::default()
    };
    if let Some(c) = &cfg.cpus {
        out.cpus = cpus(c)?;
    }
    if let Some(m) = &cfg.memory {
        out.memory = MemoryConfig {
            size: m.size,
            shared: m.shared,
        };
    }
    for (i, d) in cfg.disks.iter().flatten().enumerate() {
        out.disks
            .push(disk(d).map_err(|e| format!("field `disks[{i}]`: {e}"))?);
    }
    for (i, n) in cfg.net.iter().flatten().enumerate() {
        out.nets
            .push(net(n).map_err(|e| format!("field `net[{i}]`: {e}"))?);
    }
    if let Some(r) = &cfg.rng {
        if !matches!(r.src.as_str(), "/dev/urandom" | "/dev/random") {
            return Err(format!(
                "field `rng.src`: '{}' is not supported; Hyperpool feeds virtio-rng from the host's getrandom (use /dev/urandom)",
                r.src
            ));
        }
        out.rng = true;
    }
    if let Some(s) = &cfg.serial {
        out.serial = serial(s).map_err(|e| format!("field `serial`: {e}"))?;
    }
    if let Some(c) = &cfg.console {
        out.console = console(c).map_err(|e| format!("field `console`: {e}"))?;
    }
    if let Some(v) = &cfg.vsock {
        let cid = u32::try_from(v.cid)
            .ok()
            .filter(|&c| c >= 3)
            .ok_or_else(|| format!("field `vsock.cid`: {} is not a CID from 3 to 2^32-1", v.cid))?;
        out.vsock = Some(VsockConfig {
            cid,
            socket: PathBuf::from(&v.socket),
        });
    }
    Ok(out)
}

fn cpus(c: &api::CpusConfig) -> Result<CpusConfig, String> {
    if c.boot_vcpus == 0 {
        return Err("field `cpus.boot_vcpus`: a VM needs at least 1 vCPU".into());
    }
    if c.max_vcpus != c.boot_vcpus {
        return Err(format!(
            "field `cpus.max_vcpus`: CPU hotplug is not supported; set max_vcpus to boot_vcpus ({})",
            c.boot_vcpus
        ));
    }
    let template = match &c.x_features {
        Some(f) => {
            Some(CpuTemplate::parse(f).map_err(|e| format!("field `cpus.x_features`: {e}"))?)
        }
        None => None,
    };
    Ok(CpusConfig {
        boot: c.boot_vcpus,
        template,
    })
}

/// `vhost_user` / `vhost_socket`; `conflicts` are the fields set that the backend decides.
fn vhost_user(
    enabled: bool,
    socket: Option<&String>,
    queue_size: u16,
    conflicts: &[&str],
) -> Result<Option<VhostUserConfig>, String> {
    match (enabled, socket) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err("vhost_socket needs vhost_user: true".into()),
        (true, None) => Err("vhost_user: true needs vhost_socket".into()),
        (true, Some(s)) => {
            if let Some(field) = conflicts.first() {
                return Err(format!(
                    "{field} does not go with vhost_user: true (the backend decides it)"
                ));
            }
            Ok(Some(VhostUserConfig {
                socket: PathBuf::from(s),
                queue_size,
            }))
        }
    }
}

fn disk(d: &api::DiskConfig) -> Result<DiskConfig, String> {
    let set: Vec<&str> = [
        ("path", d.path.is_some()),
        ("readonly", d.readonly),
        ("image_type", d.image_type.is_some()),
        ("backing_files", d.backing_files),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if let Some(vu) = vhost_user(d.vhost_user, d.vhost_socket.as_ref(), DISK_QUEUE_SIZE, &set)? {
        return Ok(DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            num_queues: disk_queues(d.num_queues.unwrap_or(1))?,
            id: d.serial.clone().map(disk_serial).transpose()?,
            format: None,
            vhost_user: Some(vu),
        });
    }
    let path = d
        .path
        .as_ref()
        .filter(|p| !p.is_empty())
        .ok_or("path is required")?;
    let format = match (d.image_type, d.backing_files) {
        (Some(api::ImageType::Raw), _) => Some(DiskFormat::Raw),
        // Following a backing file is the user's explicit choice (see `disk.rs`).
        (Some(api::ImageType::Qcow2), _) | (_, true) => Some(DiskFormat::Qcow2),
        _ => None,
    };
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: d.readonly,
        num_queues: disk_queues(d.num_queues.unwrap_or(1))?,
        id: d.serial.clone().map(disk_serial).transpose()?,
        format,
        vhost_user: None,
    })
}

fn net(n: &api::NetConfig) -> Result<NetConfig, String> {
    let set: Vec<&str> = [("tap", n.tap.is_some()), ("fds", n.fds.is_some())]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
    if let Some(vu) = vhost_user(n.vhost_user, n.vhost_socket.as_ref(), NET_QUEUE_SIZE, &set)? {
        return Ok(NetConfig {
            tap: String::new(),
            fds: Vec::new(),
            mac: n.mac.as_deref().map(parse_mac).transpose()?,
            num_queues: net_queues(n.num_queues.unwrap_or(2))?,
            vhost_user: Some(vu),
        });
    }
    if let Some(fds) = n.fds.as_ref().filter(|f| !f.is_empty()) {
        if n.tap.is_some() {
            return Err("give either tap or fds, not both".into());
        }
        let pairs = u16::try_from(fds.len()).unwrap_or(u16::MAX);
        let num_queues = net_queues(n.num_queues.unwrap_or(pairs.saturating_mul(2)))?;
        if num_queues / 2 != pairs {
            return Err(format!(
                "num_queues={num_queues} needs {} fds (one TAP queue per RX/TX pair), not {pairs}",
                num_queues / 2
            ));
        }
        return Ok(NetConfig {
            tap: String::new(),
            fds: fds.clone(),
            mac: n.mac.as_deref().map(parse_mac).transpose()?,
            num_queues,
            vhost_user: None,
        });
    }
    let tap = n
        .tap
        .clone()
        .ok_or("tap is required (Hyperpool does not pick TAP names), or fds")?;
    hyperpool_devices::virtio::net::tap::check_name(&tap)?;
    Ok(NetConfig {
        tap,
        fds: Vec::new(),
        mac: n.mac.as_deref().map(parse_mac).transpose()?,
        num_queues: net_queues(n.num_queues.unwrap_or(2))?,
        vhost_user: None,
    })
}

fn serial(c: &api::ConsoleConfig) -> Result<SerialConfig, String> {
    Ok(match c.mode {
        api::ConsoleMode::Off | api::ConsoleMode::Null => SerialConfig::Off,
        api::ConsoleMode::Tty => SerialConfig::Tty,
        api::ConsoleMode::File => SerialConfig::File(file(c)?),
        api::ConsoleMode::Socket => SerialConfig::Socket {
            socket: PathBuf::from(c.socket.as_ref().ok_or("mode Socket needs socket")?),
            log: c.file.as_ref().map(PathBuf::from),
        },
        api::ConsoleMode::Pty => return Err("Pty is not supported".into()),
    })
}

fn console(c: &api::ConsoleConfig) -> Result<ConsoleConfig, String> {
    Ok(match c.mode {
        api::ConsoleMode::Off | api::ConsoleMode::Null => ConsoleConfig::Off,
        api::ConsoleMode::Tty => ConsoleConfig::Tty,
        api::ConsoleMode::File => ConsoleConfig::File(file(c)?),
        other => return Err(format!("{other:?} is not supported for the virtio console")),
    })
}

fn file(c: &api::ConsoleConfig) -> Result<PathBuf, String> {
    c.file
        .as_ref()
        .map(PathBuf::from)
        .ok_or_else(|| "mode File needs file".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VmConfig, String> {
        from_api(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn a_full_config_converts() {
        let cfg = parse(
            r#"{"cpus": {"boot_vcpus": 2, "max_vcpus": 2, "x_features": "-cx16"},
                "memory": {"size": 268435456},
                "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
                "disks": [{"path": "/a.qcow2", "image_type": "Qcow2", "readonly": true,
                           "num_queues": 2, "serial": "data"}],
                "net": [{"tap": "tap0", "mac": "52:54:00:00:00:01"}],
                "rng": {"src": "/dev/urandom"},
                "serial": {"mode": "Socket", "socket": "/run/c.sock", "file": "/run/c.log"},
                "vsock": {"cid": 5, "socket": "/run/v.sock"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.cpus.boot, 2);
        assert!(cfg.cpus.template.unwrap().hides("cx16"));
        assert_eq!(cfg.memory.size, 256 << 20);
        assert_eq!(cfg.kernel, Some(PathBuf::from("/k")));
        let d = &cfg.disks[0];
        assert!(d.readonly && d.num_queues == 2 && d.format == Some(DiskFormat::Qcow2));
        assert_eq!(d.id.as_deref(), Some("data"));
        assert_eq!(cfg.nets[0].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert!(cfg.rng);
        assert_eq!(
            cfg.serial,
            SerialConfig::Socket {
                socket: "/run/c.sock".into(),
                log: Some("/run/c.log".into())
            }
        );
        assert_eq!(cfg.vsock.unwrap().cid, 5);
        assert_eq!(cfg.on_reboot, OnReboot::Restart);
    }

    #[test]
    fn vhost_user_devices_convert() {
        let cfg = parse(
            r#"{"memory": {"size": 268435456, "shared": true},
                "disks": [{"vhost_user": true, "vhost_socket": "/run/d.sock", "num_queues": 2,
                           "queue_size": 128, "id": "disk0"}],
                "net": [{"vhost_user": true, "vhost_socket": "/run/n.sock", "vhost_mode": "Client",
                         "mac": "52:54:00:00:00:09"}]}"#,
        )
        .unwrap();
        assert!(cfg.memory.shared);
        let d = &cfg.disks[0];
        assert_eq!(
            d.vhost_user,
            Some(VhostUserConfig {
                socket: "/run/d.sock".into(),
                queue_size: 128
            })
        );
        assert_eq!(d.num_queues, 2);
        let n = &cfg.nets[0];
        assert_eq!(
            n.vhost_user.as_ref().unwrap().socket,
            PathBuf::from("/run/n.sock")
        );
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 9]));
        assert!(cfg.shared_memory());
        let plain = parse(r#"{"disks": [{"path": "/a"}]}"#).unwrap();
        assert!(
            !plain.shared_memory(),
            "private memory unless asked or needed"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 4}}"#,
                "cpus.max_vcpus",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 0, "max_vcpus": 0}}"#,
                "cpus.boot_vcpus",
            ),
            (r#"{"disks": [{"readonly": true}]}"#, "disks[0]"),
            (
                r#"{"disks": [{"path": "/a", "num_queues": 0}]}"#,
                "disks[0]",
            ),
            (
                r#"{"disks": [{"path": "/a", "direct": true}]}"#,
                "disks[0].direct",
            ),
            (
                r#"{"net": [{"tap": "t", "mac": "ff:ff:ff:ff:ff:ff"}]}"#,
                "net[0]",
            ),
            (r#"{"rng": {"src": "/dev/hwrng"}}"#, "rng.src"),
            (
                r#"{"disks": [{"vhost_user": true, "vhost_socket": "/s", "path": "/a"}]}"#,
                "disks[0]`: path does not go",
            ),
            (
                r#"{"disks": [{"vhost_user": true, "vhost_socket": "/s", "readonly": true}]}"#,
                "disks[0]`: readonly does not go",
            ),
            (
                r#"{"disks": [{"vhost_user": true}]}"#,
                "disks[0]`: vhost_user: true needs",
            ),
            (
                r#"{"net": [{"tap": "t", "vhost_socket": "/s"}]}"#,
                "net[0]`: vhost_socket needs",
            ),
            (
                r#"{"net": [{"vhost_user": true, "vhost_socket": "/s", "tap": "t"}]}"#,
                "net[0]`: tap does not go",
            ),
            (r#"{"vsock": {"cid": 2, "socket": "/s"}}"#, "vsock.cid"),
            (r#"{"serial": {"mode": "File"}}"#, "serial"),
            (
                r#"{"console": {"mode": "Socket", "socket": "/s"}}"#,
                "console",
            ),
        ];
        for (json, field) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.starts_with(&format!("field `{field}")), "{json}: {e}");
        }
    }
}
