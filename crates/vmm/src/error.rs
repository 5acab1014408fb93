//! Errors of the VMM, split by who has to act: the user (bad input) or the host/VMM.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user asked for something impossible or malformed; the text says what to change.
    #[error("{0}")]
    Config(String),
    #[error("kernel {path}: {source}")]
    KernelFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} {source}")]
    Boot {
        path: String,
        source: crate::arch::boot::BootError,
    },
    #[error("initramfs {path}: {source}")]
    InitramfsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    KvmUnavailable(String),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("ACPI: {0}")]
    Acpi(String),
    #[error("devices: {0}")]
    Devices(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl Error {
    /// True when the user can fix this by changing the command (exit code 2).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::KernelFile { .. }
                | Error::Boot { .. }
                | Error::InitramfsFile { .. }
                | Error::KvmUnavailable(_)
        )
    }

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
