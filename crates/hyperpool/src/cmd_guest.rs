//! `hyperpool guest debian DIR`: a Debian kernel and initramfs for hardware-KVM hosts.

use crate::Failure;
use crate::cli::GuestCommand;

pub fn run(cmd: GuestCommand) -> Result<u8, Failure> {
    match cmd {
        GuestCommand::Probe { dir } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
            for (name, bytes) in [
                ("probe.elf", hyperpool_probe_image::PROBE_ELF),
                ("tiny.elf", hyperpool_probe_image::TINY_ELF),
                ("tiny-idle.elf", hyperpool_probe_image::TINY_IDLE_ELF),
                (
                    "tiny-multiboot.elf",
                    hyperpool_probe_image::TINY_MULTIBOOT_ELF,
                ),
            ] {
                let path = dir.join(name);
                std::fs::write(&path, bytes)
                    .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
                println!("{}", path.display());
            }
            Ok(0)
        }
        GuestCommand::Debian { dir } => {
            let guest = hyperpool_guest_images::build_debian(&dir, &mut |step| {
                eprintln!("hyperpool: {step}")
            })
            .map_err(|e| Failure::usage(e.to_string()))?;
            println!("kernel (bzImage): {}", guest.vmlinuz.display());
            println!("kernel (vmlinux, PVH): {}", guest.vmlinux.display());
            println!("initramfs: {}", guest.initramfs.display());
            println!(
                "tools (fio, iperf3, mkfs.ext4; append to the initramfs): {} ({} packages, {} MiB unpacked)",
                guest.tools.path.display(),
                guest.tools.packages.len(),
                guest.tools.file_bytes >> 20
            );
            println!("kernel version: {}", guest.kernel_version);
            println!(
                "boot it: hyperpool run --kernel {} --initramfs {} --cmdline 'console=ttyS0'",
                guest.vmlinux.display(),
                guest.initramfs.display()
            );
            Ok(0)
        }
    }
}
