//! Checking a VM spec and turning it into the VMM's Cloud Hypervisor config.

use hyperpool_api as api;
use hyperpool_api::pool::VmSpec;
use serde_json::{Map, json};

use crate::layout::Layout;

pub const MAX_NAME: usize = 32;
const MIN_MEMORY_MIB: u64 = 16;

/// A user's mistake in a spec, as one line.
pub fn check(spec: &VmSpec) -> Result<(), String> {
    let n = &spec.name;
    if n.is_empty()
        || n.len() > MAX_NAME
        || !n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        || n.starts_with('-')
    {
        return Err(format!(
            "name '{n}': use 1 to {MAX_NAME} characters from a-z, 0-9, '-' and '_' (not starting with '-')"
        ));
    }
    if spec.cpus == 0 {
        return Err("cpus: a VM needs at least 1 vCPU".into());
    }
    if spec.memory_mib < MIN_MEMORY_MIB {
        return Err(format!(
            "memory: {} MiB is too small; give at least {MIN_MEMORY_MIB} MiB",
            spec.memory_mib
        ));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        match (&d.path, &d.base) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => return Err(format!("disks[{i}]: give exactly one of path and base")),
        }
        if d.base.is_some() && d.format.is_some() {
            return Err(format!(
                "disks[{i}]: format applies to path; an overlay on a base is always qcow2"
            ));
        }
        if let Some(f) = &d.format
            && f != "raw"
            && f != "qcow2"
        {
            return Err(format!("disks[{i}]: format '{f}' is not raw or qcow2"));
        }
    }
    if let Some(p) = &spec.placement {
        if let Some(w) = p.cpu_weight
            && !(1..=10_000).contains(&w)
        {
            return Err(format!("placement.cpu_weight {w} is not from 1 to 10000"));
        }
        if let Some(m) = p.cpu_max
            && !(m > 0.0 && m.is_finite())
        {
            return Err(format!(
                "placement.cpu_max {m} must be a positive number of cores"
            ));
        }
        if let Some(cores) = &p.pin_cores {
            let host = crate::pool::host_cores() as usize;
            if cores.is_empty() || cores.iter().any(|&c| c >= host) {
                return Err(format!(
                    "placement.pin_cores {cores:?}: give cores from 0 to {}",
                    host - 1
                ));
            }
        }
    }
    Ok(())
}

/// The config the VMM gets: the spec's devices, the console on the VM's socket with its log,
/// and each `base` disk replaced by the VM's own overlay.
pub fn vm_config(spec: &VmSpec, layout: &Layout) -> Result<api::VmConfig, String> {
    let name = &spec.name;
    let disks: Vec<serde_json::Value> = spec
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (path, image_type, backing) = match (&d.path, &d.base) {
                (Some(p), _) => (
                    p.clone(),
                    match d.format.as_deref() {
                        Some("raw") => Some("Raw"),
                        Some("qcow2") => Some("Qcow2"),
                        _ => None,
                    },
                    d.format.as_deref() == Some("qcow2"),
                ),
                (None, _) => (
                    layout.overlay(name, i).display().to_string(),
                    Some("Qcow2"),
                    true,
                ),
            };
            let mut disk = Map::new();
            disk.insert("path".into(), json!(path));
            disk.insert("readonly".into(), json!(d.readonly));
            disk.insert("id".into(), json!(format!("disk{i}")));
            disk.insert("backing_files".into(), json!(backing));
            if let Some(t) = image_type {
                disk.insert("image_type".into(), json!(t));
            }
            if let Some(q) = d.num_queues {
                disk.insert("num_queues".into(), json!(q));
            }
            if let Some(s) = &d.serial {
                disk.insert("serial".into(), json!(s));
            }
            serde_json::Value::Object(disk)
        })
        .collect();
    let nets: Vec<serde_json::Value> = spec
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({"tap": n.tap, "mac": n.mac, "num_queues": n.num_queues, "id": format!("net{i}")})
        })
        .collect();
    let mut cfg = json!({
        "cpus": {"boot_vcpus": spec.cpus, "max_vcpus": spec.cpus, "x_features": spec.cpu_features},
        "memory": {"size": spec.memory_mib << 20},
        "payload": {"kernel": spec.kernel, "initramfs": spec.initramfs, "cmdline": spec.cmdline},
        "disks": disks,
        "net": nets,
        "serial": {"mode": "Socket", "socket": layout.console_socket(name),
                   "file": layout.console_log(name)},
    });
    if spec.rng {
        cfg["rng"] = json!({"src": "/dev/urandom"});
    }
    if spec.device_processes {
        cfg["x_device_processes"] = json!(true);
    }
    if let Some(v) = &spec.vsock {
        cfg["vsock"] = json!({"cid": v.cid, "socket": v.socket});
    }
    // Nulls mean "not given": drop them so the VMM sees Cloud Hypervisor's defaults.
    strip_nulls(&mut cfg);
    serde_json::from_value(cfg).map_err(|e| e.to_string())
}

fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, v| !v.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::pool::{DiskSpec, Placement};
    use std::path::PathBuf;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            cpus: 2,
            memory_mib: 256,
            ..VmSpec::default()
        }
    }

    #[test]
    fn names_and_sizes_are_checked() {
        assert_eq!(check(&spec()), Ok(()));
        for bad in ["", "Web", "a b", "-x", &"a".repeat(33), "x/y"] {
            let s = VmSpec {
                name: bad.into(),
                ..spec()
            };
            assert!(check(&s).unwrap_err().starts_with("name"), "{bad}");
        }
        let s = VmSpec {
            memory_mib: 8,
            ..spec()
        };
        assert!(check(&s).unwrap_err().contains("at least 16 MiB"));
        let s = VmSpec {
            disks: vec![DiskSpec::default()],
            ..spec()
        };
        assert!(
            check(&s)
                .unwrap_err()
                .contains("exactly one of path and base")
        );
        let s = VmSpec {
            placement: Some(Placement {
                cpu_weight: Some(0),
                ..Placement::default()
            }),
            ..spec()
        };
        assert!(check(&s).unwrap_err().contains("cpu_weight"));
    }

    #[test]
    fn config_carries_devices_console_and_overlays() {
        let layout = Layout {
            state_dir: PathBuf::from("/s"),
        };
        let s = VmSpec {
            disks: vec![
                DiskSpec {
                    path: Some("/img/data.raw".into()),
                    readonly: true,
                    ..DiskSpec::default()
                },
                DiskSpec {
                    base: Some("/img/base.raw".into()),
                    ..DiskSpec::default()
                },
            ],
            rng: true,
            ..spec()
        };
        let cfg = vm_config(&s, &layout).unwrap();
        cfg.check().unwrap();
        let disks = cfg.disks.unwrap();
        assert_eq!(disks[0].path.as_deref(), Some("/img/data.raw"));
        assert!(disks[0].readonly && disks[0].image_type.is_none());
        assert_eq!(disks[1].path.as_deref(), Some("/s/vms/web-1/disk1.qcow2"));
        assert_eq!(disks[1].image_type, Some(api::ImageType::Qcow2));
        let serial = cfg.serial.unwrap();
        assert_eq!(serial.mode, api::ConsoleMode::Socket);
        assert_eq!(serial.socket.as_deref(), Some("/s/vms/web-1/console.sock"));
        assert_eq!(cfg.cpus.unwrap().boot_vcpus, 2);
        assert_eq!(cfg.memory.unwrap().size, 256 << 20);
        assert!(cfg.rng.is_some());
    }
}
