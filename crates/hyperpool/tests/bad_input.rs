//! Every kind of bad input: one line on stderr saying what is wrong, exit status 2, no panic.

mod common;

use common::*;
use std::process::Command;

fn fails(args: &[&str], needle: &str) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    assert_refused(&run_quiet(&full), needle);
}

#[test]
fn option_syntax_errors() {
    fails(&["--cpus", "boot=two"], "not a number of vCPUs");
    fails(&["--cpus", "boot=1,max=8"], "unknown cpus key 'max'");
    fails(
        &["--cpus", "boot=1,features=-warp"],
        "unknown CPU feature 'warp'",
    );
    fails(&["--cpus", "boot=1,features=+avx"], "can only be hidden");
    fails(&["--memory", "lots"], "not a size");
    fails(
        &["--memory", "size=1G,hugepages=on"],
        "unknown memory key 'hugepages'",
    );
    fails(&["--serial", "pty"], "not one of tty, off, file=PATH");
    fails(&["--on-reboot", "explode"], "explode");
    fails(&["--frobnicate"], "--frobnicate");
}

#[test]
fn impossible_resources() {
    if !kvm_available() {
        return;
    }
    fails(&["--cpus", "0"], "at least 1 vCPU");
    fails(&["--cpus", "100000"], "allows at most");
    fails(&["--memory", "8M"], "at least 16 MiB");
    fails(&["--memory", "64T"], "the host has only");
    fails(&["--memory", "1.1G"], "4 KiB pages");
}

#[test]
fn bad_files() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    fails(&["--kernel", missing.to_str().unwrap()], "No such file");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text\n").unwrap();
    fails(&["--kernel", text.to_str().unwrap()], "is not a kernel");
    fails(&["--kernel", dir.path().to_str().unwrap()], "kernel");
    fails(&["--initramfs", missing.to_str().unwrap()], "initramfs");
    fails(&["--kernel", "/dev/zero"], "not a regular file");
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    fails(
        &["--memory", "32M", "--initramfs", big.to_str().unwrap()],
        "larger than the guest's memory",
    );
    // A bzImage header without the 64-bit entry (protocol 2.11, as a 32-bit kernel has).
    let mut bz = vec![0u8; 4096];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020bu16.to_le_bytes());
    let old = dir.path().join("bzImage-i386");
    std::fs::write(&old, &bz).unwrap();
    fails(&["--kernel", old.to_str().unwrap()], "only 64-bit kernels");
    let unwritable = dir.path().join("no-such-dir/console.log");
    fails(
        &["--serial", &format!("file={}", unwritable.display())],
        "--serial file=",
    );
}

/// Runs hyperpool in a private mount namespace where /dev is an empty tmpfs.
#[test]
fn kvm_missing_or_not_accessible() {
    if !kvm_available() || !is_root() {
        eprintln!("skipping: needs root and /dev/kvm");
        return;
    }
    let bin = hyperpool();
    let script = format!(
        "mount -t tmpfs none /dev && HYPERPOOL_LOG=off exec {} run",
        bin.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let f = Finished::from(out);
    assert_refused(&f, "/dev/kvm does not exist");

    // An unprivileged user cannot open the root-only /dev/kvm.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("run")
        .env("HYPERPOOL_LOG", "off")
        .output()
        .unwrap();
    let f = Finished::from(out);
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
    if mode.is_ok_and(|m| m & 0o006 == 0) {
        assert_refused(&f, "not readable and writable by this user");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
