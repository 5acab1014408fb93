//! The types of Hyperpool's REST APIs, shared by the servers (the VMM process, the pool daemon)
//! and their clients.
//!
//! The per-VM API follows Cloud Hypervisor's `cloud-hypervisor.yaml` so that its clients
//! (ch-remote, Kata Containers, libvirt) can drive a Hyperpool VMM. A field Hyperpool does not
//! implement is accepted only at its default value; any other value, and any field the document
//! does not know, is refused with the field's name ([`Unsupported`]), never silently ignored.

#[cfg(feature = "client")]
pub mod client;
mod defaults;
pub mod pool;
mod vm_config;
mod vm_info;

pub use defaults::Unsupported;
pub use vm_config::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, ImageType, MemoryConfig, NetConfig,
    PayloadConfig, RngConfig, VmConfig, VsockConfig,
};
pub use vm_info::{PciDeviceInfo, VmCounters, VmInfo, VmRemoveDevice, VmState, VmmPingResponse};

/// Where every per-VM API path starts.
pub const API_PREFIX: &str = "/api/v1";
