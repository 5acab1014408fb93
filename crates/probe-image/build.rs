//! Builds the bare-metal probe guest (`guest/probe`, its own cargo workspace) with a nested
//! `cargo build` and copies the ELFs into OUT_DIR for `include_bytes!`.
//!
//! The nested build gets a clean environment: everything cargo sets for build scripts or
//! that would change how the guest is compiled (RUSTFLAGS, wrappers, target dir, build
//! target, profile overrides, ...) is removed, and the guest's link flags are passed only
//! for the explicit `--target`, so host build scripts are unaffected.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
/// Keep in sync with guest/probe/.cargo/config.toml.
const GUEST_RUSTFLAGS: &str = "-C relocation-model=static \
    -C link-arg=-nostartfiles -C link-arg=-nostdlib -C link-arg=-static -C link-arg=-no-pie \
    -C link-arg=-Wl,--no-dynamic-linker -C target-feature=-sse,-sse2";
/// (binary name in the guest package, file name in OUT_DIR)
const BINARIES: [(&str, &str); 4] = [
    ("hyperpool-probe", "probe.elf"),
    ("tiny", "tiny.elf"),
    ("tiny-idle", "tiny-idle.elf"),
    ("tiny-multiboot", "tiny-multiboot.elf"),
];

/// Variables removed from the nested cargo's environment, besides the prefixes below.
const REMOVE_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_LINKER",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
];
const REMOVE_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_PROFILE_",
    "CARGO_TARGET_",
    "DEP_",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest_dir.join("../../guest/probe");
    let guest = guest
        .canonicalize()
        .unwrap_or_else(|e| panic!("guest/probe not found at {}: {e}", guest.display()));

    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
        "build.rs",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }

    let target_dir = out_dir.join("probe-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if REMOVE_VARS.contains(&k) || REMOVE_PREFIXES.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd.env(RUSTFLAGS_VAR, GUEST_RUSTFLAGS);

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run nested cargo for guest/probe: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        eprintln!(
            "==== nested cargo build of guest/probe failed ({}) ====",
            output.status
        );
        eprintln!("command: {cmd:?}");
        eprintln!("---- stderr ----\n{stderr}");
        eprintln!("---- stdout ----\n{stdout}");
        panic!(
            "building the probe guest (guest/probe) failed: {}\n{stderr}",
            output.status
        );
    }

    let release = target_dir.join(TARGET).join("release");
    for (bin, file) in BINARIES {
        copy(&release.join(bin), &out_dir.join(file));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}
