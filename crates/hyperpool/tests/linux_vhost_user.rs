//! Linux's own virtio drivers as the judge of vhost-user device backends: the project's Debian
//! guest boots under QEMU's emulator (TCG, no KVM, so it runs on any host), QEMU being the
//! vhost-user frontend and each backend in [`BlkBackend::ALL`] serving the disk. The guest runs
//! mkfs.ext4, fio and iperf3 from the guest's tools archive; the host checks the image with
//! e2fsprogs and qemu-img.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{Netns, netns_available};
use common::qemu_tcg::{TcgBoot, TcgRun, tcg_guest};
use common::vhost_user_backend::{BlkBackend, ImageFormat, NetBackend, RngBackend};

/// A TCG boot takes seconds to /init; fio and mkfs run emulated too.
const LIMIT: Duration = Duration::from_secs(300);
const DISK_BYTES: u64 = 64 << 20;

/// Output of a host command that must succeed.
fn host(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_program(program: &str, arg: &str) -> bool {
    let ok = Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty());
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "{program} is missing on a CI machine (scripts/setup-host.sh installs it)"
        );
        eprintln!("skipping: {program} is missing");
    }
    ok
}

fn sha256(path: &Path) -> String {
    host("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn sparse_image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
}

/// Boots the guest with `backend` serving `image` and runs `script`.
fn run_blk(
    guest: &Path,
    backend: BlkBackend,
    image: &Path,
    format: ImageFormat,
    readonly: bool,
    script: &str,
) -> TcgRun {
    let dir = tempfile::tempdir().unwrap();
    let b = backend.spawn(dir.path(), image, format, readonly);
    let run = TcgBoot {
        guest,
        script,
        device_args: b.blk_device_args(),
        limit: LIMIT,
        netns: None,
    }
    .run();
    b.stop();
    eprintln!("{}: guest run took {:?}", backend.name(), run.elapsed);
    run
}

/// The guest's tools run (their libraries and loader are all there) and /test.sh's output
/// and exit status come back over the serial console.
#[test]
fn guest_runs_its_tools_under_tcg() {
    let Some(guest) = tcg_guest() else { return };
    // busybox's sh runs its own applets first (mke2fs is one), so e2fsprogs' goes by path;
    // mkfs.ext4 is no applet.
    let script = "fio --version\n\
                  iperf3 --version | head -n 1\n\
                  /sbin/mke2fs -V 2>&1 | head -n 1\n\
                  mkfs.ext4 -V 2>&1 | tail -n 1\n\
                  echo TOOLS-DONE\n\
                  exit 7\n";
    let run = TcgBoot {
        guest: &guest,
        script,
        device_args: Vec::new(),
        limit: LIMIT,
        netns: None,
    }
    .run();
    assert_eq!(run.script_status, Some(7), "{}", run.describe());
    for want in [
        "fio-3",
        "iperf 3",
        "mke2fs 1.",
        "Using EXT2FS Library",
        "TOOLS-DONE",
    ] {
        assert!(run.serial.contains(want), "{want}\n{}", run.describe());
    }
    assert!(run.to_init.is_some(), "{}", run.describe());
}

/// mkfs.ext4 and files written by Linux's ext4 over virtio-blk end up in the host's image.
#[test]
fn ext4_files_written_in_the_guest_are_on_the_host_image() {
    let Some(guest) = tcg_guest() else { return };
    if !has_program("debugfs", "-V") {
        return;
    }
    for &backend in BlkBackend::ALL {
        if !backend.available() {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.raw");
        sparse_image(&image);
        let script = "set -e\n\
                      mkfs.ext4 -q -F /dev/vda\n\
                      mkdir -p /mnt/d\n\
                      mount -t ext4 /dev/vda /mnt/d\n\
                      mkdir /mnt/d/dir\n\
                      echo hello-from-linux > /mnt/d/dir/hello.txt\n\
                      dd if=/dev/urandom of=/mnt/d/big bs=1M count=4 2>/dev/null\n\
                      echo BIG-SHA=$(sha256sum /mnt/d/big | cut -d' ' -f1)\n\
                      sync\n\
                      umount /mnt/d\n";
        let run = run_blk(&guest, backend, &image, ImageFormat::Raw, false, script);
        run.assert_ok();
        let img = image.to_str().unwrap();
        assert_eq!(
            host("debugfs", &["-R", "cat /dir/hello.txt", img]),
            "hello-from-linux\n",
            "{}",
            backend.name()
        );
        let big = tmp.path().join("big");
        host(
            "debugfs",
            &["-R", &format!("dump /big {}", big.display()), img],
        );
        assert_eq!(std::fs::metadata(&big).unwrap().len(), 4 << 20);
        assert_eq!(Some(sha256(&big).as_str()), run.value("BIG-SHA"));
        // The file system is clean: the guest's unmount reached the image.
        host("e2fsck", &["-f", "-n", img]);
    }
}

/// fio's own data verification (crc32c in every block) over random writes passes.
#[test]
fn fio_randwrite_verify_passes() {
    let Some(guest) = tcg_guest() else { return };
    for &backend in BlkBackend::ALL {
        if !backend.available() {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.raw");
        sparse_image(&image);
        let script = "fio --name=verify --filename=/dev/vda --size=16M --rw=randwrite --bs=4k \
                      --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 \
                      --verify_fatal=1 --minimal > /tmp/fio.out\n\
                      status=$?\n\
                      cat /tmp/fio.out\n\
                      echo FIO-WRITE-IOPS=$(cut -d';' -f49 /tmp/fio.out)\n\
                      echo FIO-ERROR=$(cut -d';' -f5 /tmp/fio.out)\n\
                      exit $status\n";
        let run = run_blk(&guest, backend, &image, ImageFormat::Raw, false, script);
        run.assert_ok();
        assert_eq!(run.value("FIO-ERROR"), Some("0"), "{}", run.describe());
        let iops: f64 = run
            .value("FIO-WRITE-IOPS")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no IOPS\n{}", run.describe()));
        assert!(iops > 0.0, "{}", run.describe());
        eprintln!(
            "{}: fio 4k randwrite+verify under TCG: {iops} write IOPS",
            backend.name()
        );
        // fio wrote its pattern: the image is no longer all zeroes.
        let data = std::fs::read(&image).unwrap();
        assert!(data[..16 << 20].iter().any(|&b| b != 0));
    }
}

/// A read-only export: the guest sees a read-only disk, writes fail, the image is untouched.
#[test]
fn readonly_backend_refuses_writes() {
    let Some(guest) = tcg_guest() else { return };
    for &backend in BlkBackend::ALL {
        if !backend.available() {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.raw");
        let pattern: Vec<u8> = (0..DISK_BYTES as usize / 4096)
            .flat_map(|i| [(i % 251) as u8; 4096])
            .collect();
        std::fs::write(&image, &pattern).unwrap();
        let before = sha256(&image);
        let script = "echo RO=$(cat /sys/block/vda/ro)\n\
                      dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1\n\
                      echo DD-STATUS=$?\n\
                      mkfs.ext4 -q -F /dev/vda 2>&1\n\
                      echo MKFS-STATUS=$?\n\
                      dd if=/dev/vda bs=4096 skip=3 count=1 2>/dev/null | od -An -tx1 | head -n 1 \
                      | tr -d ' ' | sed 's/^/BLOCK3=/'\n";
        let run = run_blk(&guest, backend, &image, ImageFormat::Raw, true, script);
        run.assert_ok();
        assert_eq!(run.value("RO"), Some("1"), "{}", run.describe());
        assert_ne!(run.value("DD-STATUS"), Some("0"), "{}", run.describe());
        assert_ne!(run.value("MKFS-STATUS"), Some("0"), "{}", run.describe());
        // Reads still work.
        assert_eq!(
            run.value("BLOCK3"),
            Some("03".repeat(16).as_str()),
            "{}",
            run.describe()
        );
        assert_eq!(sha256(&image), before, "{}", backend.name());
    }
}

/// Writes to a qcow2 overlay stay in the overlay: the raw base is unchanged, `qemu-img check`
/// is clean, and the overlay reads back what the guest wrote.
#[test]
fn qcow2_overlay_keeps_its_base() {
    let Some(guest) = tcg_guest() else { return };
    if !has_program("qemu-img", "--version") {
        return;
    }
    for &backend in BlkBackend::ALL {
        if !backend.available() {
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("base.raw");
        let overlay = tmp.path().join("overlay.qcow2");
        let pattern: Vec<u8> = (0..DISK_BYTES as usize).map(|i| (i / 512) as u8).collect();
        std::fs::write(&base, &pattern).unwrap();
        let before = sha256(&base);
        host(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                overlay.to_str().unwrap(),
            ],
        );
        let script = "set -e\n\
                      printf HYPERPOOL-QCOW2 | dd of=/dev/vda bs=512 seek=2048 conv=notrunc 2>/dev/null\n\
                      fio --name=verify --filename=/dev/vda --offset=8M --size=8M --rw=randwrite \
                      --bs=4k --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c \
                      --verify_fatal=1 --minimal > /dev/null\n\
                      sync\n\
                      echo FIRST=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | od -An -tx1 | head -n 1 | tr -d ' ')\n";
        let run = run_blk(&guest, backend, &overlay, ImageFormat::Qcow2, false, script);
        run.assert_ok();
        // Unwritten sectors read through to the base: sector 0 is all zero bytes.
        assert_eq!(
            run.value("FIRST"),
            Some("00".repeat(16).as_str()),
            "{}",
            run.describe()
        );
        assert_eq!(sha256(&base), before, "{}: base changed", backend.name());
        host("qemu-img", &["check", "-q", overlay.to_str().unwrap()]);
        let flat = tmp.path().join("flat.raw");
        host(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                overlay.to_str().unwrap(),
                flat.to_str().unwrap(),
            ],
        );
        let flat = std::fs::read(&flat).unwrap();
        assert_eq!(&flat[1 << 20..(1 << 20) + 15], b"HYPERPOOL-QCOW2");
        // Sector 2049 was not written: still the base's pattern.
        assert_eq!(flat[2049 * 512], pattern[2049 * 512]);
    }
}

/// virtio-net under Linux: address, ping and an iperf3 run to a server on the host end of a
/// TAP in a test namespace, for each net backend.
#[test]
fn net_guest_pings_and_runs_iperf3() {
    let Some(guest) = tcg_guest() else { return };
    if !netns_available() || !has_program("iperf3", "--version") {
        return;
    }
    for &backend in NetBackend::ALL {
        let mut ns = Netns::new("tcgnet");
        let tap = "hptcg0";
        let exec = |args: &[&str]| {
            let ok = ns.exec("ip").args(args).status().is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?} in {}", ns.name);
        };
        exec(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        exec(&["addr", "add", "10.77.0.1/24", "dev", tap]);
        exec(&["link", "set", tap, "up"]);
        exec(&["link", "set", "lo", "up"]);
        let server = ns
            .exec("iperf3")
            .args(["-s", "-1", "-B", "10.77.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn iperf3 -s");
        ns.keep(server);
        let script = "set -e\n\
                      ip link set eth0 up\n\
                      ip addr add 10.77.0.2/24 dev eth0\n\
                      ping -c 3 -W 5 10.77.0.1\n\
                      iperf3 -c 10.77.0.1 -t 3 -f m > /tmp/iperf.out\n\
                      cat /tmp/iperf.out\n\
                      echo IPERF-MBITS=$(grep receiver /tmp/iperf.out | awk '{print $7}')\n";
        let sockets = tempfile::tempdir().unwrap();
        let (process, device_args) = backend.attach(tap, "52:54:00:77:00:02", &ns, sockets.path());
        let started = Instant::now();
        let run = TcgBoot {
            guest: &guest,
            script,
            device_args,
            limit: LIMIT,
            netns: Some(&ns.name),
        }
        .run();
        drop(process);
        run.assert_ok();
        assert!(
            run.serial
                .contains("3 packets transmitted, 3 packets received"),
            "{}",
            run.describe()
        );
        let mbits: f64 = run
            .value("IPERF-MBITS")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no iperf3 result\n{}", run.describe()));
        assert!(mbits > 0.0, "{}", run.describe());
        eprintln!(
            "{}: virtio-net under TCG: iperf3 {mbits} Mbit/s; test took {:?}",
            backend.name(),
            started.elapsed()
        );
    }
}

/// Linux's hw_random core picks the virtio-rng device and reads entropy from it: two reads
/// differ and have the length asked for.
#[test]
fn rng_feeds_linux_hwrng() {
    let Some(guest) = tcg_guest() else { return };
    for &backend in RngBackend::ALL {
        let script = "set -e\n\
                      echo RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current)\n\
                      echo RNG-BYTES=$(dd if=/dev/hwrng bs=1024 count=16 2>/dev/null | wc -c)\n\
                      echo RNG-A=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | sha256sum | cut -c1-64)\n\
                      echo RNG-B=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | sha256sum | cut -c1-64)\n";
        let sockets = tempfile::tempdir().unwrap();
        let (process, device_args) = backend.attach(sockets.path());
        let run = TcgBoot {
            guest: &guest,
            script,
            device_args,
            limit: LIMIT,
            netns: None,
        }
        .run();
        drop(process);
        run.assert_ok();
        assert!(
            run.value("RNG-CURRENT")
                .is_some_and(|c| c.starts_with("virtio_rng")),
            "{}: {}",
            backend.name(),
            run.describe()
        );
        assert_eq!(run.value("RNG-BYTES"), Some("16384"), "{}", run.describe());
        let (a, b) = (run.value("RNG-A"), run.value("RNG-B"));
        assert!(a.is_some_and(|a| a.len() == 64), "{}", run.describe());
        assert_ne!(a, b, "{}", run.describe());
    }
}
