//! virtio-blk on qcow2: the probe guest writes, flushes and reads back its pattern on a qcow2
//! overlay of a raw base; afterwards the overlay (converted to raw) holds the pattern over the
//! base's data, the base is byte-identical to before and `qemu-img check` finds no errors. Bad
//! qcow2 images stop the VMM with one line and exit 2 before the guest starts.
//!
//! Needs `qemu-img` (qemu-utils): the tests skip without it, except in CI (`CI=true`), where
//! they fail.

mod common;

use common::*;
use std::path::Path;

const BASE_SIZE: usize = 16 << 20;

/// A raw base with a byte per sector that is never the probe's, and `overlay.qcow2` on it.
fn base_and_overlay(dir: &Path) -> Vec<u8> {
    let base: Vec<u8> = (0..BASE_SIZE)
        .map(|i| 0x80 | (i / 512 % 97) as u8)
        .collect();
    std::fs::write(dir.join("base.raw"), &base).unwrap();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "overlay.qcow2",
        ],
    );
    base
}

#[test]
fn probe_writes_pattern_into_overlay_and_base_is_untouched() {
    if !kvm_available() || !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = base_and_overlay(dir.path());
    let overlay = dir.path().join("overlay.qcow2");
    let disk = format!("path={},id=cow,format=qcow2", overlay.display());
    let f = run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=blk",
            "--disk",
            &disk,
        ],
        PROBE_LIMIT,
    );
    assert_eq!(f.probe_ok("blk"), "disks=1 cow:rw", "{}", f.describe());
    assert_eq!(f.code(), 0, "{}", f.describe());

    assert_eq!(
        std::fs::read(dir.path().join("base.raw")).unwrap(),
        base,
        "the base image changed"
    );
    let check = qemu_img(dir.path(), &["check", "overlay.qcow2"]);
    assert!(check.contains("No errors were found"), "{check}");
    qemu_img(
        dir.path(),
        &["convert", "-O", "raw", "overlay.qcow2", "out.raw"],
    );
    let out = std::fs::read(dir.path().join("out.raw")).unwrap();
    assert_eq!(out.len(), BASE_SIZE);
    assert_eq!(&out[512..4608], &blk_pattern()[..]);
    assert_eq!(&out[..512], &base[..512]);
    assert_eq!(&out[4608..], &base[4608..]);
}

fn fails(disk: &str, needle: &str) {
    assert_refused(
        &run_quiet(&["run", "--serial", "off", "--disk", disk]),
        needle,
    );
}

#[test]
fn bad_qcow2_images_exit_2_before_the_guest_starts() {
    if !kvm_available() || !qemu_img_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    base_and_overlay(dir.path());
    let overlay = dir.path().join("overlay.qcow2");
    let good = std::fs::read(&overlay).unwrap();
    let bad = dir.path().join("bad.qcow2");
    let disk = format!("path={},format=qcow2", bad.display());
    let patched = |off: usize, val: &[u8]| {
        let mut b = good.clone();
        b[off..off + val.len()].copy_from_slice(val);
        std::fs::write(&bad, b).unwrap();
    };

    patched(20, &99u32.to_be_bytes());
    fails(&disk, "corrupt header");
    patched(32, &2u32.to_be_bytes());
    fails(&disk, "unsupported: encryption");
    std::fs::write(&bad, &good[..64]).unwrap();
    fails(&disk, "corrupt header");

    // A detected (not declared) qcow2 image never follows a backing file: a guest could have
    // written that header into a raw disk of its own.
    fails(
        &format!("path={}", overlay.display()),
        "add format=qcow2 to use it",
    );

    std::fs::remove_file(dir.path().join("base.raw")).unwrap();
    fails(
        &format!("path={},format=qcow2", overlay.display()),
        &dir.path().join("base.raw").display().to_string(),
    );
}
