//! Linux guests for the Hyperpool VMM, built from Debian packages.
//!
//! - [`cpio`]: newc cpio archive writer (initramfs format).
//! - [`bzimage`]: extracts the uncompressed `vmlinux` ELF from a bzImage.
//! - [`elf`]: minimal ELF64 reading (PVH note, module sections).
//! - [`modules`]: kernel module dependencies and load order.
//! - [`initramfs`]: the busybox initramfs and its `/init`.
//! - [`elf_closure`]: the shared libraries a program needs, found in extracted packages.
//! - [`tools`]: `fio`, `iperf3` and `mkfs.ext4` with their libraries, as a second archive.
//! - [`debian`]: [`build_debian`], downloading and assembling everything.

pub mod bzimage;
pub mod cpio;
pub mod debian;
pub mod elf;
pub mod elf_closure;
pub mod initramfs;
pub mod modules;
pub mod tools;

pub use bzimage::{BzImageError, BzImageHeader, Compression, Vmlinux, extract_vmlinux};
pub use cpio::{CpioError, CpioWriter};
pub use debian::{DebianGuest, DebianOptions, Error, build_debian, build_debian_with};
pub use elf::ElfInfo;
pub use initramfs::{INIT_MARKER, InitramfsSpec, ModuleFile, write_initramfs};
pub use modules::{LoadPlan, ModuleError, ModuleTree};
