//! `VmConfig` and its parts, as in Cloud Hypervisor's OpenAPI document. Each struct parses the
//! fields Hyperpool implements and keeps the rest in `other`, which [`VmConfig::check`] holds
//! against the table of fields accepted at their default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::defaults::{Allowed, Unsupported, check};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<CpusConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryConfig>,
    #[serde(default)]
    pub payload: PayloadConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Vec<NetConfig>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console: Option<ConsoleConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Hyperpool's extension (`x_`, as Cloud Hypervisor marks its experimental fields): serve
    /// the disks and TAP network cards from device processes of their own over vhost-user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x_device_processes: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpusConfig {
    pub boot_vcpus: u32,
    pub max_vcpus: u32,
    /// Hyperpool's CPU template, e.g. `-cx16,-xsave` (the `--cpus features=` option). An
    /// extension: Cloud Hypervisor marks its own experimental fields with `x_` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_features: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryConfig {
    pub size: u64,
    /// Guest RAM in a memfd mapped shared (implied by any vhost-user device).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// `None` boots Hyperpool's built-in probe guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageType {
    FlatVmdk,
    FixedVhd,
    Qcow2,
    Raw,
    Vhdx,
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// The device's identifier in this API (for `vm.remove-device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The serial the guest reads with GET_ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_type: Option<ImageType>,
    /// Whether a qcow2 image may name a backing file (Cloud Hypervisor's default: no).
    #[serde(default)]
    pub backing_files: bool,
    /// Served by a vhost-user backend listening on `vhost_socket` (instead of `path`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// TAP queues passed with the request as SCM_RIGHTS (one per queue pair), instead of `tap`:
    /// the VMM replaces the numbers the client sent with the descriptors it received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fds: Option<Vec<i32>>,
    /// Served by a vhost-user backend listening on `vhost_socket` (instead of a TAP).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngConfig {
    pub src: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub mode: ConsoleMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl ConsoleConfig {
    pub fn new(mode: ConsoleMode) -> Self {
        Self {
            mode,
            file: None,
            socket: None,
            other: Map::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub socket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

use Allowed::{Any, Empty, False, Int, Null, Str, True};

const VM: &[(&str, Allowed)] = &[
    ("rate_limit_groups", Empty),
    ("balloon", Null),
    ("fs", Empty),
    ("generic_vhost_user", Empty),
    ("pmem", Empty),
    ("debug_console", Null),
    ("devices", Empty),
    ("user_devices", Empty),
    ("vdpa", Empty),
    ("numa", Empty),
    ("iommu", False),
    ("watchdog", False),
    ("rtc", Null),
    ("pvpanic", False),
    ("pci_segments", Empty),
    ("platform", Null),
    ("tpm", Null),
    ("landlock_enable", False),
    ("landlock_rules", Empty),
];

const CPUS: &[(&str, Allowed)] = &[
    ("topology", Null),
    ("kvm_hyperv", False),
    ("max_phys_bits", Null),
    ("nested", True),
    ("affinity", Empty),
    ("features", Null),
    ("core_scheduling", Str("Vm")),
];

const MEMORY: &[(&str, Allowed)] = &[
    ("hotplug_size", Int(0)),
    ("hotplugged_size", Int(0)),
    ("mergeable", False),
    // Which hotplug mechanism would be used: meaningless without hotplug_size.
    ("hotplug_method", Any),
    ("hugepages", False),
    ("hugepage_size", Null),
    ("prefault", False),
    ("reserve", False),
    ("thp", True),
    ("zones", Empty),
];

const PAYLOAD: &[(&str, Allowed)] = &[("firmware", Null), ("igvm", Null), ("host_data", Null)];

const DISK: &[(&str, Allowed)] = &[
    ("direct", False),
    ("iommu", False),
    ("queue_size", Int(128)),
    ("rate_limiter_config", Null),
    ("pci_segment", Int(0)),
    ("pci_device_id", Null),
    ("rate_limit_group", Null),
    ("queue_affinity", Empty),
    ("sparse", True),
    // Hyperpool always locks the whole image (flock); both granularities keep two VMs apart.
    ("lock_granularity", Any),
];

const NET: &[(&str, Allowed)] = &[
    ("ip", Null),
    ("mask", Null),
    ("host_mac", Null),
    ("mtu", Null),
    ("iommu", False),
    ("queue_size", Int(256)),
    ("vhost_mode", Str("Client")),
    ("pci_segment", Int(0)),
    ("pci_device_id", Null),
    ("rate_limiter_config", Null),
    ("offload_tso", True),
    ("offload_ufo", True),
    ("offload_csum", True),
];

const RNG: &[(&str, Allowed)] = &[
    ("iommu", False),
    ("pci_segment", Int(0)),
    ("pci_device_id", Null),
];

const CONSOLE: &[(&str, Allowed)] = &[("iommu", False), ("id", Any)];

const VSOCK: &[(&str, Allowed)] = &[
    ("iommu", False),
    ("pci_segment", Int(0)),
    ("pci_device_id", Null),
];

impl VmConfig {
    /// Refuses any field set to a value Hyperpool would not honour, naming it.
    pub fn check(&self) -> Result<(), Unsupported> {
        check("", &self.other, VM)?;
        if let Some(c) = &self.cpus {
            check("cpus", &c.other, CPUS)?;
        }
        if let Some(m) = &self.memory {
            check("memory", &m.other, MEMORY)?;
        }
        check("payload", &self.payload.other, PAYLOAD)?;
        for (i, d) in self.disks.iter().flatten().enumerate() {
            d.check(&format!("disks[{i}]"))?;
        }
        for (i, n) in self.net.iter().flatten().enumerate() {
            n.check(&format!("net[{i}]"))?;
        }
        if let Some(r) = &self.rng {
            check("rng", &r.other, RNG)?;
        }
        for (name, c) in [("serial", &self.serial), ("console", &self.console)] {
            if let Some(c) = c {
                check(name, &c.other, CONSOLE)?;
                if c.mode == ConsoleMode::Pty {
                    return Err(Unsupported {
                        field: format!("{name}.mode"),
                        why: "Pty is not supported by Hyperpool yet (use Tty, File or Socket)"
                            .into(),
                    });
                }
            }
        }
        if let Some(v) = &self.vsock {
            check("vsock", &v.other, VSOCK)?;
        }
        Ok(())
    }
}

impl DiskConfig {
    pub fn check(&self, path: &str) -> Result<(), Unsupported> {
        check(path, &self.other, DISK)?;
        match self.image_type {
            Some(ImageType::FlatVmdk | ImageType::FixedVhd | ImageType::Vhdx) => Err(Unsupported {
                field: format!("{path}.image_type"),
                why: "only Raw and Qcow2 images are supported".into(),
            }),
            _ => Ok(()),
        }
    }
}

impl NetConfig {
    pub fn check(&self, path: &str) -> Result<(), Unsupported> {
        check(path, &self.other, NET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What ch-remote / a generated client sends for a small VM, defaults spelled out.
    fn full_default_config() -> Value {
        json!({
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "nested": true,
                     "topology": null, "affinity": null},
            "memory": {"size": 268435456, "mergeable": false, "hotplug_method": "Acpi",
                       "shared": false, "hugepages": false, "prefault": false, "thp": true,
                       "zones": null},
            "payload": {"kernel": "/k/vmlinux", "cmdline": "console=ttyS0", "firmware": null},
            "disks": [{"path": "/d/a.raw", "readonly": false, "direct": false, "iommu": false,
                       "num_queues": 1, "queue_size": 128, "vhost_user": false, "id": "disk0",
                       "pci_segment": 0, "sparse": true}],
            "net": [{"tap": "tap0", "mac": "52:54:00:12:34:56", "num_queues": 2,
                     "queue_size": 256, "iommu": false, "vhost_user": false,
                     "vhost_mode": "Client", "offload_tso": true}],
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"mode": "Tty", "iommu": false},
            "console": {"mode": "Off", "iommu": false},
            "vsock": {"cid": 3, "socket": "/tmp/v.sock", "iommu": false},
            "iommu": false, "watchdog": false, "pvpanic": false, "fs": null, "pmem": [],
            "landlock_enable": false
        })
    }

    #[test]
    fn cloud_hypervisor_defaults_are_accepted_and_round_trip() {
        let cfg: VmConfig = serde_json::from_value(full_default_config()).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.cpus.as_ref().unwrap().boot_vcpus, 2);
        assert_eq!(cfg.memory.as_ref().unwrap().size, 256 << 20);
        let d = &cfg.disks.as_ref().unwrap()[0];
        assert_eq!(d.path.as_deref(), Some("/d/a.raw"));
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert_eq!(cfg.serial.as_ref().unwrap().mode, ConsoleMode::Tty);
        // Serialising and parsing again gives the same config (vm.info returns it).
        let again: VmConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn non_default_unimplemented_fields_are_refused_by_name() {
        let cases = [
            ("/disks/0/queue_size", json!(64), "disks[0].queue_size"),
            ("/net/0/ip", json!("10.0.0.1"), "net[0].ip"),
            ("/memory/hugepages", json!(true), "memory.hugepages"),
            ("/cpus/topology", json!({"packages": 2}), "cpus.topology"),
            ("/fs", json!([{"tag": "x", "socket": "/s"}]), "fs"),
            ("/payload/firmware", json!("/fw"), "payload.firmware"),
            ("/disks/0/image_type", json!("Vhdx"), "disks[0].image_type"),
            ("/serial/mode", json!("Pty"), "serial.mode"),
        ];
        for (pointer, value, field) in cases {
            let mut v = full_default_config();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let target = if parent.is_empty() {
                &mut v
            } else {
                v.pointer_mut(parent).unwrap()
            };
            target[key] = value.clone();
            let cfg: VmConfig = serde_json::from_value(v).unwrap();
            let e = cfg.check().unwrap_err();
            assert_eq!(e.field, field, "{pointer} = {value}: {e}");
        }
        let mut v = full_default_config();
        v["no_such_thing"] = json!(1);
        let cfg: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(
            cfg.check().unwrap_err().to_string(),
            "field `no_such_thing`: unknown field"
        );
    }

    #[test]
    fn minimal_config_needs_nothing_but_a_payload() {
        let cfg: VmConfig = serde_json::from_str(r#"{"payload": {}}"#).unwrap();
        cfg.check().unwrap();
        assert!(cfg.payload.kernel.is_none());
        assert!(cfg.cpus.is_none());
    }
}
