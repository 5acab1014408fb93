//! virtio-blk end to end: the probe guest (virtio-drivers as an independent driver) writes,
//! flushes and reads back a pattern on a raw image; the host file holds it after poweroff; a
//! read-only disk refuses writes; bad disk options stop the VMM with exit 2 before the guest.

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::path::Path;

const IMAGE_SIZE: u64 = 16 << 20;

fn image() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(IMAGE_SIZE).unwrap();
    f
}

fn disk_arg(path: &Path, extra: &str) -> String {
    format!("path={}{extra}", path.display())
}

fn probe_blk(disks: &[String]) -> Finished {
    let mut args = vec!["run", "--serial", "tty", "--cmdline", "probe=blk"];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    run(&args, PROBE_LIMIT)
}

#[test]
fn probe_writes_pattern_and_readonly_disk_refuses() {
    if !kvm_available() {
        return;
    }
    let rw = image();
    let ro = image();
    std::fs::write(ro.path(), vec![0x33u8; IMAGE_SIZE as usize]).unwrap();
    let f = probe_blk(&[
        disk_arg(rw.path(), ""),
        disk_arg(ro.path(), ",readonly=on,id=golden"),
    ]);
    let figures = f.probe_ok("blk");
    let rw_name = rw.path().file_name().unwrap().to_str().unwrap();
    let rw_id = &rw_name[rw_name.len().saturating_sub(20)..];
    assert_eq!(
        figures,
        format!("disks=2 {rw_id}:rw,golden:ro"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());

    let data = std::fs::read(rw.path()).unwrap();
    assert_eq!(data.len() as u64, IMAGE_SIZE);
    assert_eq!(&data[512..4608], &blk_pattern()[..]);
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[4608..8192].iter().all(|&b| b == 0));
    let data = std::fs::read(ro.path()).unwrap();
    assert!(data.iter().all(|&b| b == 0x33), "read-only image changed");
}

#[test]
fn several_queues_still_serve_the_probe() {
    if !kvm_available() {
        return;
    }
    let img = image();
    let f = probe_blk(&[disk_arg(img.path(), ",num_queues=4,id=mq")]);
    assert_eq!(f.probe_ok("blk"), "disks=1 mq:rw", "{}", f.describe());
    assert_eq!(
        &std::fs::read(img.path()).unwrap()[512..4608],
        &blk_pattern()[..]
    );
}

fn fails(disks: &[String], needle: &str) {
    let mut args = vec!["run", "--serial", "off"];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    assert_refused(&run_quiet(&args), needle);
}

#[test]
fn bad_disks_exit_2_before_the_guest_starts() {
    if !kvm_available() {
        return;
    }
    let img = image();
    let path = img.path().display().to_string();

    // Locked by another process (here: this test holding flock).
    // SAFETY: flock on a file descriptor this test owns.
    let r = unsafe { libc::flock(img.as_file().as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(r, 0);
    fails(&[disk_arg(img.path(), "")], &path);
    fails(&[disk_arg(img.path(), "")], "locked");
    // SAFETY: as above.
    unsafe { libc::flock(img.as_file().as_raw_fd(), libc::LOCK_UN) };

    // The same writable image twice in one VM.
    fails(
        &[disk_arg(img.path(), ""), disk_arg(img.path(), "")],
        "locked",
    );
    fails(
        &["path=/nonexistent/disk.img".into()],
        "/nonexistent/disk.img",
    );
    fails(
        &[
            disk_arg(img.path(), ",readonly=on,id=a"),
            disk_arg(img.path(), ",readonly=on,id=a"),
        ],
        "id 'a'",
    );
    fails(&[disk_arg(img.path(), ",num_queues=0")], "num_queues");
    fails(&[disk_arg(img.path(), ",num_queues=100000")], "num_queues");
    fails(&[disk_arg(img.path(), ",cache=off")], "unknown disk key");
}
