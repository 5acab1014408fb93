//! Builds a real Debian guest with apt. Skips (with a message) when the host cannot
//! download packages, unless CI=true, where that is a failure.
//!
//! Set HYPERPOOL_GUEST_CACHE to a directory to reuse downloaded .debs across runs.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use hyperpool_guest_images::{
    DebianOptions, build_debian_with, bzimage, elf, initramfs::INIT_MARKER,
};

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

#[test]
fn builds_debian_guest() {
    let out = tempfile::tempdir().unwrap();
    let cache = std::env::var_os("HYPERPOOL_GUEST_CACHE").map(PathBuf::from);
    let opts = DebianOptions {
        cache_dir: cache.clone(),
    };
    let mut log = Vec::new();
    let result = build_debian_with(out.path(), &opts, &mut |m: &str| {
        eprintln!("build_debian: {m}");
        log.push(m.to_owned());
    });
    let guest = match result {
        Ok(g) => g,
        Err(e) if e.is_environment() && !ci() => {
            eprintln!("skipping: cannot download Debian packages here: {e}");
            return;
        }
        Err(e) => panic!("build_debian failed: {e}"),
    };
    assert!(
        log.iter().any(|m| m.contains("extracting")),
        "progress was reported: {log:?}"
    );

    // vmlinuz is a bzImage.
    let vmlinuz = std::fs::read(&guest.vmlinuz).unwrap();
    let hdr = bzimage::parse_header(&vmlinuz).unwrap();
    assert!(hdr.compression.is_some(), "{hdr:?}");

    // vmlinux is an x86_64 ELF64 with the PVH note.
    let vmlinux = std::fs::read(&guest.vmlinux).unwrap();
    let info = elf::parse(&vmlinux).unwrap();
    assert_eq!(info.machine, elf::EM_X86_64);
    assert!(info.pvh_entry.is_some(), "no Xen PVH note in vmlinux");
    assert_eq!(info.pvh_entry, guest.pvh_entry);

    let version = std::fs::read_to_string(out.path().join("KERNEL_VERSION")).unwrap();
    assert_eq!(version.trim(), guest.kernel_version);

    // The initramfs, through the real cpio(1).
    let mut cpio_bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&guest.initramfs).unwrap())
        .read_to_end(&mut cpio_bytes)
        .unwrap();
    let listing = match cpio_list(&cpio_bytes) {
        Some(l) => l,
        None if !ci() => {
            eprintln!("skipping cpio listing: cpio(1) not installed (apt-get install cpio)");
            return;
        }
        None => panic!("cpio(1) is required under CI=true: apt-get install cpio"),
    };
    let names: Vec<&str> = listing.lines().collect();
    for want in ["init", "bin/busybox", "bin/sh", "dev/console", "dev/null"] {
        assert!(names.contains(&want), "initramfs lacks {want}: {names:?}");
    }
    let has_blk = names.iter().any(|n| n.ends_with("/virtio_blk.ko"));
    assert!(
        has_blk || guest.builtin_modules.iter().any(|m| m == "virtio_blk"),
        "virtio_blk is neither in the initramfs nor built in: {names:?}"
    );
    for m in &guest.modules {
        assert!(
            names.iter().any(|n| n.ends_with(&format!("/{m}.ko"))
                || n.ends_with(&format!("/{}.ko", m.replace('_', "-")))),
            "module {m} missing from the initramfs"
        );
    }
    let init = String::from_utf8_lossy(&cpio_bytes);
    assert!(init.contains(INIT_MARKER));
    eprintln!(
        "kernel {} ({} payload), modules: {:?}, built in: {:?}",
        guest.kernel_version, guest.compression, guest.modules, guest.builtin_modules
    );

    // The tools archive: the programs, the loader they name, and only packages that gave files.
    let mut tools_bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&guest.tools.path).unwrap())
        .read_to_end(&mut tools_bytes)
        .unwrap();
    let tools_listing = cpio_list(&tools_bytes).expect("cpio(1) listed the initramfs already");
    let tool_names: Vec<&str> = tools_listing.lines().collect();
    for want in [
        "usr/bin/fio",
        "usr/bin/iperf3",
        "sbin/mke2fs",
        "sbin/mkfs.ext4",
        "etc/mke2fs.conf",
        "lib64/ld-linux-x86-64.so.2",
    ] {
        assert!(tool_names.contains(&want), "tools archive lacks {want}");
    }
    for pkg in ["fio", "iperf3", "e2fsprogs", "libc6"] {
        assert!(
            guest.tools.packages.iter().any(|p| p == pkg),
            "{pkg} not among {:?}",
            guest.tools.packages
        );
    }
    assert!(guest.tools.packages_fetched >= guest.tools.packages.len());
    assert!(guest.tools.files > 3 && guest.tools.file_bytes > 1 << 20);
    eprintln!(
        "tools: {} files, {} MiB from {} packages ({} fetched)",
        guest.tools.files,
        guest.tools.file_bytes >> 20,
        guest.tools.packages.len(),
        guest.tools.packages_fetched
    );

    boot_under_qemu(&guest);
}

/// Boots the guest under QEMU (TCG, no KVM needed) with `hp.run=`, when QEMU is installed.
/// QEMU is not a dependency of the project, so its absence only skips this part.
fn boot_under_qemu(guest: &hyperpool_guest_images::DebianGuest) {
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let spawned = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&guest.vmlinuz)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .args([
            "-append",
            "console=ttyS0 quiet panic=-1 hp.run=\"cat /proc/modules; ls /sys/block\"",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw",
            disk.path().display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = spawned else {
        eprintln!("skipping boot check: qemu-system-x86_64 not installed");
        return;
    };
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let console = reader.join().unwrap();
    assert!(
        status.is_some(),
        "guest did not power off within 180 s:\n{console}"
    );
    assert!(
        console.contains(&format!("{INIT_MARKER} (kernel {})", guest.kernel_version)),
        "no init marker on the console:\n{console}"
    );
    assert!(
        console.contains("HYPERPOOL-INIT: hp.run exited with status 0"),
        "{console}"
    );
    if guest.modules.iter().any(|m| m == "virtio_blk") {
        assert!(
            console.contains("virtio_blk "),
            "virtio_blk not loaded:\n{console}"
        );
        assert!(console.contains("\nvda"), "no virtio disk:\n{console}");
    }
}

fn cpio_list(archive: &[u8]) -> Option<String> {
    let mut child = Command::new("cpio")
        .arg("-it")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take().unwrap();
    let data = archive.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "cpio -it failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}
