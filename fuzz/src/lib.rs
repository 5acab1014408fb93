//! Shared pieces of Hyperpool's fuzz targets (`fuzz_targets/`): how an input becomes guest
//! memory, a driver that brings a virtio device up through the real virtio-pci transport, a
//! scratch directory on tmpfs, and the input layouts (each with an encoder, used by
//! `examples/gen_seeds.rs` to write the checked-in seeds).
//!
//! Every input decodes: missing bytes read as zero, so the fuzzer never wastes runs on inputs a
//! target rejects before reaching the code under test.

pub mod chain_case;
pub mod device_case;
pub mod input;
pub mod memory;
pub mod pci_case;
pub mod qcow2_case;
pub mod rig;
pub mod scratch;
