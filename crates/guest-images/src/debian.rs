//! Building a Linux guest (kernel, `vmlinux`, busybox initramfs) from Debian packages.
//!
//! Uses the host's `apt-cache`, `apt-get download` and `dpkg -x` (so it needs a Debian
//! host with package lists), never installs anything into the host system.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bzimage::{self, BzImageError, Compression};
use crate::cpio::CpioError;
use crate::elf_closure::ClosureError;
use crate::initramfs::{self, InitramfsSpec, ModuleFile};
use crate::modules::{ModuleError, ModuleTree};
use crate::tools::{self, ToolsArchive};

/// Metapackage that tracks the current Debian cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Statically linked busybox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Modules the initramfs loads (those that are modules rather than built-ins in the
/// kernel), with their dependencies.
pub const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// A built guest; all paths are inside the output directory.
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// The bzImage, copied from the package's `/boot/vmlinuz-<version>`.
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF kernel extracted from it.
    pub vmlinux: PathBuf,
    /// `initramfs.cpio.gz`.
    pub initramfs: PathBuf,
    /// `tools.cpio.gz`: fio, iperf3, mkfs.ext4 and their libraries, to append to `initramfs`.
    pub tools: ToolsArchive,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// Compression the bzImage payload used.
    pub compression: Compression,
    /// PVH entry point of `vmlinux`, if it has the Xen PVH note.
    pub pvh_entry: Option<u64>,
    /// Modules in the initramfs, in the order `/init` loads them.
    pub modules: Vec<String>,
    /// Wanted modules that this kernel has built in.
    pub builtin_modules: Vec<String>,
}

/// Options for [`build_debian_with`].
#[derive(Debug, Clone, Default)]
pub struct DebianOptions {
    /// Where `.deb` files are downloaded and reused from; default `DIR/cache`.
    pub cache_dir: Option<PathBuf>,
}

/// Errors from [`build_debian`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{tool}` was not found: building Debian guests needs a Debian host with apt and dpkg")]
    ToolMissing { tool: String },
    #[error(
        "apt knows no package {package:?}: the package lists are empty or stale; \
         run `apt-get update` (as root) and retry"
    )]
    AptListsEmpty { package: String },
    #[error("could not resolve {KERNEL_METAPACKAGE} to a kernel package: {0}")]
    KernelNotResolved(String),
    #[error(
        "`apt-get download {package}` failed ({status}): {stderr}\n\
         check that the Debian mirror is reachable, or run `apt-get update` if lists are stale"
    )]
    Download {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "{what} not found in the extracted package ({path}): is the .deb complete? delete it from the cache to download it again"
    )]
    MissingInPackage { what: String, path: PathBuf },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path}: {source}")]
    Kernel { path: PathBuf, source: BzImageError },
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error("writing initramfs: {0}")]
    Cpio(#[from] CpioError),
    #[error("guest tools: {0}")]
    ElfClosure(#[from] ClosureError),
    #[error(
        "guest tools: {soname} (needed by {needed_by} from package {package}) is in none of the \
         packages downloaded, nor in the dependencies of {owners}"
    )]
    LibraryNotFound {
        soname: String,
        needed_by: String,
        package: String,
        owners: String,
    },
}

impl Error {
    /// True when the host cannot fetch packages at all (no apt, no lists, download
    /// failure), as opposed to a bug or bad package contents.
    pub fn is_environment(&self) -> bool {
        matches!(
            self,
            Self::ToolMissing { .. } | Self::AptListsEmpty { .. } | Self::Download { .. }
        )
    }
}

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { what, path, source }
}

/// Builds a guest into `dir` with `.deb` files cached in `dir/cache`.
pub fn build_debian(dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<DebianGuest, Error> {
    build_debian_with(dir, &DebianOptions::default(), progress)
}

/// Builds a guest into `dir`:
/// `vmlinuz`, `vmlinux`, `initramfs.cpio.gz`, `tools.cpio.gz` and `KERNEL_VERSION`.
pub fn build_debian_with(
    dir: &Path,
    opts: &DebianOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<DebianGuest, Error> {
    let cache = opts.cache_dir.clone().unwrap_or_else(|| dir.join("cache"));
    std::fs::create_dir_all(&cache).map_err(io("creating cache directory", &cache))?;

    // 1. Packages.
    progress(&format!("resolving {KERNEL_METAPACKAGE}"));
    let kernel_pkg = resolve_kernel_package(&cache)?;
    let kernel_deb = ensure_deb(&cache, &kernel_pkg, progress)?;
    let busybox_deb = ensure_deb(&cache, BUSYBOX_PACKAGE, progress)?;

    // 2. Extraction.
    let staging = dir.join("staging");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .map_err(io("removing old staging directory", &staging))?;
    }
    let kroot = staging.join("kernel");
    let broot = staging.join("busybox");
    progress(&format!("extracting {}", file_name(&kernel_deb)));
    dpkg_extract(&kernel_deb, &kroot)?;
    progress(&format!("extracting {}", file_name(&busybox_deb)));
    dpkg_extract(&busybox_deb, &broot)?;

    let kernel_version = kernel_pkg
        .strip_prefix("linux-image-")
        .unwrap_or(&kernel_pkg)
        .to_owned();
    let boot_image = kroot.join("boot").join(format!("vmlinuz-{kernel_version}"));
    if !boot_image.is_file() {
        return Err(Error::MissingInPackage {
            what: format!("/boot/vmlinuz-{kernel_version}"),
            path: boot_image,
        });
    }

    // 3. Kernel images.
    std::fs::create_dir_all(dir).map_err(io("creating output directory", dir))?;
    let image = std::fs::read(&boot_image).map_err(io("reading", &boot_image))?;
    let vmlinuz = dir.join("vmlinuz");
    write_atomic(&vmlinuz, &image)?;
    let header = bzimage::parse_header(&image).map_err(|source| Error::Kernel {
        path: boot_image.clone(),
        source,
    })?;
    progress(&format!(
        "decompressing vmlinux ({} payload, {} KiB)",
        header
            .compression
            .map_or("unknown".to_owned(), |c| c.to_string()),
        header.payload_length / 1024
    ));
    let vml = bzimage::extract_vmlinux(&image).map_err(|source| Error::Kernel {
        path: boot_image.clone(),
        source,
    })?;
    let vmlinux = dir.join("vmlinux");
    write_atomic(&vmlinux, &vml.elf)?;
    drop(image);

    // 4. Modules.
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| kroot.join(m).join(&kernel_version))
        .find(|p| p.is_dir())
        .ok_or_else(|| Error::MissingInPackage {
            what: format!("/lib/modules/{kernel_version}"),
            path: kroot.join("lib/modules").join(&kernel_version),
        })?;
    progress("resolving virtio module dependencies");
    let tree = ModuleTree::scan(&moddir)?;
    let plan = tree.plan(GUEST_MODULES)?;
    if !plan.missing.is_empty() {
        progress(&format!(
            "note: kernel has no module or built-in named {}",
            plan.missing.join(", ")
        ));
    }
    let mut modules = Vec::new();
    for name in &plan.order {
        let data = tree.read_uncompressed(name)?;
        let rel_path = tree
            .uncompressed_rel_path(name)
            .unwrap_or_else(|| format!("{name}.ko"));
        let deps = tree.deps_of(name)?.unwrap_or_default();
        modules.push(ModuleFile {
            name: name.clone(),
            rel_path,
            deps,
            data,
        });
    }

    // 5. Initramfs.
    let busybox_path = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| broot.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingInPackage {
            what: "/bin/busybox".to_owned(),
            path: broot.join("bin/busybox"),
        })?;
    let busybox = std::fs::read(&busybox_path).map_err(io("reading", &busybox_path))?;
    progress(&format!(
        "writing initramfs ({} modules: {})",
        modules.len(),
        plan.order.join(" ")
    ));
    let initramfs_path = dir.join("initramfs.cpio.gz");
    let tmp = tmp_path(&initramfs_path);
    let file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let spec = InitramfsSpec {
        kernel_version: &kernel_version,
        busybox: &busybox,
        modules: &modules,
    };
    let gz = initramfs::write_initramfs(gz, &spec)?;
    let buf = gz.finish().map_err(io("compressing", &tmp))?;
    let file = buf.into_inner().map_err(|e| Error::Io {
        what: "writing",
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &initramfs_path).map_err(io("renaming", &tmp))?;

    // 6. Tools, a second archive.
    let tools = tools::build_tools(dir, &cache, &staging, progress)?;

    write_atomic(
        &dir.join("KERNEL_VERSION"),
        format!("{kernel_version}\n").as_bytes(),
    )?;
    std::fs::remove_dir_all(&staging).map_err(io("removing staging directory", &staging))?;
    progress(&format!("guest ready in {}", dir.display()));

    Ok(DebianGuest {
        vmlinuz,
        vmlinux,
        initramfs: initramfs_path,
        tools,
        kernel_version,
        compression: vml.compression,
        pvh_entry: vml.pvh_entry,
        modules: plan.order,
        builtin_modules: plan.builtin,
    })
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub(crate) fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = tmp_path(path);
    std::fs::write(&tmp, data).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", &tmp))
}

/// Runs a command with a C locale; returns stdout, or the exit status and stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Result<String, (String, String)>, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.env("LC_ALL", "C").output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing {
                tool: program.clone(),
            }
        } else {
            Error::Io {
                what: "running",
                path: PathBuf::from(&program),
                source: e,
            }
        }
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Ok(if out.status.success() {
        Ok(stdout)
    } else {
        Err((out.status.to_string(), stderr))
    })
}

/// Picks the real kernel package out of `apt-cache depends linux-image-cloud-amd64`.
pub fn parse_kernel_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && *p != KERNEL_METAPACKAGE && !p.starts_with('<'))
        .map(str::to_owned)
}

/// Parses the `Candidate:` of `apt-cache policy`; `None` for `(none)` or no output.
pub fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_owned)
}

/// File name prefix `apt-get download` uses for `pkg` at `version` (`:` is escaped).
pub fn deb_prefix(pkg: &str, version: &str) -> String {
    format!("{pkg}_{}_", version.replace(':', "%3a"))
}

fn cached_debs(cache: &Path, matches: &dyn Fn(&str) -> bool) -> Result<Vec<PathBuf>, Error> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(cache).map_err(io("reading cache directory", cache))? {
        let e = e.map_err(io("reading cache directory", cache))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && matches(&name) {
            let mtime = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            found.push((mtime, e.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().rev().map(|(_, p)| p).collect())
}

fn resolve_kernel_package(cache: &Path) -> Result<String, Error> {
    if let Ok(out) = run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))? {
        if let Some(pkg) = parse_kernel_depends(&out) {
            return Ok(pkg);
        }
        if !out.trim().is_empty() {
            return Err(Error::KernelNotResolved(format!(
                "no linux-image-* dependency in `apt-cache depends` output: {}",
                out.trim()
            )));
        }
    }
    // No lists: fall back to a kernel already in the cache.
    let cached = cached_debs(cache, &|n| {
        n.starts_with("linux-image-")
            && !n.starts_with(&format!("{KERNEL_METAPACKAGE}_"))
            && n.split('_')
                .next()
                .is_some_and(|p| p.ends_with("-cloud-amd64"))
    })?;
    if let Some(name) = cached
        .first()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').next())
    {
        return Ok(name.to_owned());
    }
    Err(Error::AptListsEmpty {
        package: KERNEL_METAPACKAGE.to_owned(),
    })
}

/// Returns the path of `pkg`'s candidate `.deb` in `cache`, downloading it if needed.
pub(crate) fn ensure_deb(
    cache: &Path,
    pkg: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, Error> {
    let candidate = match run(Command::new("apt-cache").args(["policy", pkg]))? {
        Ok(out) => parse_candidate(&out),
        Err(_) => None,
    };
    ensure_deb_version(cache, pkg, candidate, progress)
}

/// The candidate versions of several packages from one `apt-cache policy` (each run loads
/// apt's whole cache, about a second); packages apt does not know are absent.
pub(crate) fn candidates(pkgs: &[String]) -> Result<BTreeMap<String, String>, Error> {
    Ok(
        match run(Command::new("apt-cache").arg("policy").args(pkgs))? {
            Ok(out) => parse_candidates(&out),
            Err(_) => BTreeMap::new(),
        },
    )
}

/// `Candidate:` of each package in a multi-package `apt-cache policy` output.
pub fn parse_candidates(policy: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pkg: Option<&str> = None;
    for line in policy.lines() {
        if !line.starts_with(' ') {
            pkg = line.strip_suffix(':');
        } else if let Some(p) = pkg
            && let Some(v) = parse_candidate(line)
        {
            out.insert(p.to_owned(), v);
        }
    }
    out
}

/// Like [`ensure_deb`] with the candidate version already known (`None`: apt has none).
pub(crate) fn ensure_deb_version(
    cache: &Path,
    pkg: &str,
    candidate: Option<String>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, Error> {
    let Some(version) = candidate else {
        // No lists (or unknown package): an already downloaded .deb will do.
        let any = format!("{pkg}_");
        if let Some(p) = cached_debs(cache, &|n| n.starts_with(&any))?
            .into_iter()
            .next()
        {
            progress(&format!(
                "apt lists unavailable; reusing cached {}",
                file_name(&p)
            ));
            return Ok(p);
        }
        return Err(Error::AptListsEmpty {
            package: pkg.to_owned(),
        });
    };
    let prefix = deb_prefix(pkg, &version);
    if let Some(p) = cached_debs(cache, &|n| n.starts_with(&prefix))?
        .into_iter()
        .next()
    {
        progress(&format!("reusing cached {}", file_name(&p)));
        return Ok(p);
    }

    progress(&format!("downloading {pkg} {version} (apt-get download)"));
    // Download into a private directory so a failed download leaves no partial .deb.
    let tmp = cache.join(format!(".download-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("removing", &tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
    let result = run(Command::new("apt-get")
        .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{pkg}={version}"))
        .current_dir(&tmp));
    let outcome = (|| {
        if let Err((status, stderr)) = result? {
            let lists_problem = ["Unable to locate package", "has no installation candidate"]
                .iter()
                .any(|m| stderr.contains(m));
            return Err(if lists_problem {
                Error::AptListsEmpty {
                    package: pkg.to_owned(),
                }
            } else {
                Error::Download {
                    package: pkg.to_owned(),
                    status,
                    stderr,
                }
            });
        }
        let debs = cached_debs(&tmp, &|n| n.starts_with(&prefix))?;
        let deb = debs.first().ok_or_else(|| Error::Download {
            package: pkg.to_owned(),
            status: "exit status: 0".to_owned(),
            stderr: format!("no {prefix}*.deb was written"),
        })?;
        let dest = cache.join(file_name(deb));
        std::fs::rename(deb, &dest).map_err(io("moving download into cache", deb))?;
        Ok(dest)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    outcome
}

pub(crate) fn dpkg_extract(deb: &Path, dest: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dest).map_err(io("creating", dest))?;
    match run(Command::new("dpkg").arg("-x").arg(deb).arg(dest))? {
        Ok(_) => Ok(()),
        Err((status, stderr)) => Err(Error::Command {
            command: format!(
                "dpkg -x {} {} (delete the .deb to download it again)",
                deb.display(),
                dest.display()
            ),
            status,
            stderr,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_metapackage_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_kernel_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alt = "linux-image-cloud-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.1.0-9-cloud-amd64\n  Recommends: firmware\n";
        assert_eq!(
            parse_kernel_depends(alt).as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(parse_kernel_depends(""), None);
    }

    #[test]
    fn parses_policy_candidate() {
        let out = "busybox-static:\n  Installed: (none)\n  Candidate: 1:1.35.0-4+deb12u1+b1\n  Version table:\n";
        assert_eq!(
            parse_candidate(out).as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
        assert_eq!(parse_candidate(""), None);
        let many = "libc6:\n  Installed: 2.36-9\n  Candidate: 2.36-9+deb12u14\n  Version table:\n \
                    *** 2.36-9 500\n        500 http://x bookworm/main amd64 Packages\n\
                    zlib1g:\n  Installed: (none)\n  Candidate: 1:1.2.13.dfsg-1\n\
                    gone:\n  Installed: (none)\n  Candidate: (none)\n";
        let c = parse_candidates(many);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c["libc6"], "2.36-9+deb12u14");
        assert_eq!(c["zlib1g"], "1:1.2.13.dfsg-1");
        assert_eq!(
            deb_prefix("busybox-static", "1:1.35.0-4"),
            "busybox-static_1%3a1.35.0-4_"
        );
    }

    #[test]
    fn environment_errors_are_flagged() {
        assert!(
            Error::AptListsEmpty {
                package: "x".into()
            }
            .is_environment()
        );
        let msg = Error::AptListsEmpty {
            package: "x".into(),
        }
        .to_string();
        assert!(msg.contains("run `apt-get update`"), "{msg}");
        assert!(!Error::KernelNotResolved("x".into()).is_environment());
    }
}
