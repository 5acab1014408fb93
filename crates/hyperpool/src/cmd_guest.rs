//! `hyperpool guest debian DIR`: a Debian kernel and initramfs for hardware-KVM hosts.

use crate::Failure;
use crate::cli::GuestCommand;

pub fn run(cmd: GuestCommand) -> Result<u8, Failure> {
    match cmd {
        GuestCommand::Debian { dir } => {
            let guest = hyperpool_guest_images::build_debian(&dir, &mut |step| {
                eprintln!("hyperpool: {step}")
            })
            .map_err(|e| Failure::usage(e.to_string()))?;
            println!("kernel (bzImage): {}", guest.vmlinuz.display());
            println!("kernel (vmlinux, PVH): {}", guest.vmlinux.display());
            println!("initramfs: {}", guest.initramfs.display());
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
