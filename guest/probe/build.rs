//! Adds the linker script (absolute path) and layout flags for the guest binaries.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rustc-link-arg-bins=-Wl,-z,max-page-size=4096");
    println!("cargo:rustc-link-arg-bins=-Wl,--build-id=none");
    // The Multiboot test kernel has no PVH entry; its ELF entry is the Multiboot one.
    println!("cargo:rustc-link-arg-bin=tiny-multiboot=-Wl,-e,mb_start32");
}
