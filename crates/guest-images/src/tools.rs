//! `fio`, `iperf3` and `mkfs.ext4` for the guest, from Debian packages, with exactly the shared
//! libraries and the dynamic loader they need, written as a second initramfs archive
//! (`tools.cpio.gz`). Linux unpacks concatenated archives in order, so a boot that wants the tools
//! passes `initramfs.cpio.gz` followed by `tools.cpio.gz`; boots that do not (the PVM boot tests,
//! where the kernel's decompressor runs emulated) keep the small archive alone.
//!
//! The libraries are found by walking `DT_NEEDED` ([`crate::elf_closure`]) in the extracted
//! packages; a library that is missing is looked for in the `Section: libs` dependencies of the
//! package whose object needs it (Debian policy makes a package depend on the providers of the
//! libraries it links), downloaded and extracted, until nothing is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::debian::{
    Error, candidates, dpkg_extract, ensure_deb_version, file_name, io, run, tmp_path,
};
use crate::elf_closure::{self, Closure, ElfCache, Entry};

/// A Debian package and the guest paths taken from it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub package: &'static str,
    pub paths: &'static [&'static str],
}

/// What goes into `tools.cpio.gz` (plus everything these need).
pub const GUEST_TOOLS: &[Tool] = &[
    Tool {
        package: "fio",
        paths: &["/usr/bin/fio"],
    },
    Tool {
        package: "iperf3",
        paths: &["/usr/bin/iperf3"],
    },
    Tool {
        package: "e2fsprogs",
        paths: &["/sbin/mke2fs", "/sbin/mkfs.ext4", "/etc/mke2fs.conf"],
    },
];

/// Name of the archive in the guest directory.
pub const TOOLS_ARCHIVE: &str = "tools.cpio.gz";
/// Packages the last successful resolution used, in the cache: lets a host without apt lists
/// rebuild from the cached `.deb` files.
const MANIFEST: &str = "tools-packages.txt";
/// Resolution rounds before giving up (each round adds a dependency level).
const MAX_ROUNDS: usize = 16;

/// What [`build_tools`] wrote.
#[derive(Debug, Clone)]
pub struct ToolsArchive {
    pub path: PathBuf,
    /// Packages whose files are in it.
    pub packages: Vec<String>,
    /// Packages downloaded and extracted, including those that turned out not to be needed.
    pub packages_fetched: usize,
    /// Regular files and their total size, uncompressed.
    pub files: usize,
    pub file_bytes: u64,
}

/// The first alternative of each `Depends:`/`PreDepends:` line of `apt-cache depends` for
/// several packages, by package; virtual packages (`<name>`) are left out.
pub fn parse_depends(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut after_alternative = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            let name = line.trim();
            current = (!name.is_empty()).then(|| name.to_owned());
            if let Some(c) = &current {
                out.entry(c.clone()).or_default();
            }
            after_alternative = false;
            continue;
        }
        let trimmed = line.trim_start();
        let (alternative, rest) = match trimmed.strip_prefix('|') {
            Some(r) => (true, r),
            None => (false, trimmed),
        };
        let Some(dep) = rest
            .strip_prefix("Depends:")
            .or_else(|| rest.strip_prefix("PreDepends:"))
        else {
            continue;
        };
        let first = !after_alternative;
        after_alternative = alternative;
        let dep = dep.trim();
        if let (true, Some(c)) = (first, &current)
            && !dep.starts_with('<')
            && !dep.is_empty()
        {
            out.entry(c.clone()).or_default().push(dep.to_owned());
        }
    }
    out
}

/// `Package:` → `Section:` from `apt-cache show` output.
pub fn parse_sections(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pkg = None;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("Package:") {
            pkg = Some(p.trim().to_owned());
        } else if let (Some(s), Some(p)) = (line.strip_prefix("Section:"), &pkg) {
            out.insert(p.clone(), s.trim().to_owned());
        }
    }
    out
}

/// Library dependencies of `owners` not yet in `have`: those in `Section: libs` first; if
/// there are none, every dependency. `None` when apt cannot answer (no lists).
fn lib_dependencies(
    owners: &BTreeSet<String>,
    have: &BTreeMap<String, PathBuf>,
) -> Result<Option<Vec<String>>, Error> {
    let Ok(text) = run(Command::new("apt-cache")
        .args(["depends", "--no-recommends", "--no-suggests"])
        .args([
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(owners))?
    else {
        return Ok(None);
    };
    let deps: BTreeSet<String> = parse_depends(&text)
        .into_values()
        .flatten()
        .map(|d| d.split(':').next().unwrap_or(&d).to_owned())
        .filter(|d| !have.contains_key(d))
        .collect();
    if deps.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let sections = match run(Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(&deps))?
    {
        Ok(text) => parse_sections(&text),
        Err(_) => BTreeMap::new(),
    };
    let libs: Vec<String> = deps
        .iter()
        .filter(|d| sections.get(*d).is_some_and(|s| s == "libs"))
        .cloned()
        .collect();
    Ok(Some(if libs.is_empty() {
        deps.into_iter().collect()
    } else {
        libs
    }))
}

/// Downloads (or reuses) the tools' packages and their libraries, extracts them under
/// `staging`, and writes `dir/tools.cpio.gz`.
pub fn build_tools(
    dir: &Path,
    cache: &Path,
    staging: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ToolsArchive, Error> {
    let mut trees: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let fetch = |pkgs: &[String],
                 trees: &mut BTreeMap<String, PathBuf>,
                 order: &mut Vec<String>,
                 progress: &mut dyn FnMut(&str)|
     -> Result<(), Error> {
        let mut versions = candidates(pkgs)?;
        for pkg in pkgs {
            let deb = ensure_deb_version(cache, pkg, versions.remove(pkg), progress)?;
            let root = staging.join("tools").join(pkg);
            dpkg_extract(&deb, &root)?;
            trees.insert(pkg.clone(), root);
            order.push(pkg.clone());
        }
        Ok(())
    };
    let tools: Vec<String> = GUEST_TOOLS.iter().map(|t| t.package.to_owned()).collect();
    fetch(&tools, &mut trees, &mut order, progress)?;
    let roots: Vec<&str> = GUEST_TOOLS.iter().flat_map(|t| t.paths).copied().collect();
    let manifest = cache.join(MANIFEST);
    let mut rounds = 0;
    let mut elf_cache = ElfCache::default();
    let closure: Closure = loop {
        let tree_list: Vec<PathBuf> = order.iter().map(|p| trees[p].clone()).collect();
        let c = elf_closure::closure(&tree_list, &roots, &mut elf_cache)?;
        if c.unresolved.is_empty() {
            break c;
        }
        rounds += 1;
        let owners: BTreeSet<String> = c.unresolved.iter().map(|u| order[u.tree].clone()).collect();
        let wanted = match lib_dependencies(&owners, &trees)? {
            Some(w) => w,
            // No apt lists: the packages of the last good build, if cached.
            None => std::fs::read_to_string(&manifest)
                .unwrap_or_default()
                .lines()
                .map(str::trim)
                .filter(|p| !p.is_empty() && !trees.contains_key(*p))
                .map(str::to_owned)
                .collect(),
        };
        if wanted.is_empty() || rounds > MAX_ROUNDS {
            let u = &c.unresolved[0];
            return Err(Error::LibraryNotFound {
                soname: u.name.clone(),
                needed_by: u.needed_by.clone(),
                package: order[u.tree].clone(),
                owners: owners.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        progress(&format!(
            "{} libraries missing ({}...): fetching {}",
            c.unresolved.len(),
            c.unresolved[0].name,
            wanted.join(" ")
        ));
        fetch(&wanted, &mut trees, &mut order, progress)?;
    };

    // Which packages contributed files, for the manifest and the report.
    let mut used: BTreeSet<String> = BTreeSet::new();
    for e in closure.entries.values() {
        if let Entry::File(host) = e
            && let Some(pkg) = order.iter().find(|p| host.starts_with(&trees[*p]))
        {
            used.insert(pkg.clone());
        }
    }
    let list: String = used.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(&manifest, list).map_err(io("writing", &manifest))?;

    let path = dir.join(TOOLS_ARCHIVE);
    let file_bytes = closure.file_bytes();
    progress(&format!(
        "writing {} ({} packages, {} MiB uncompressed)",
        file_name(&path),
        used.len(),
        file_bytes / (1024 * 1024)
    ));
    let tmp = tmp_path(&path);
    let file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    let gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    );
    let gz = write_archive(gz, &closure)?;
    let buf = gz.finish().map_err(io("compressing", &tmp))?;
    let file = buf.into_inner().map_err(|e| Error::Io {
        what: "writing",
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
    Ok(ToolsArchive {
        path,
        packages: used.into_iter().collect(),
        packages_fetched: order.len(),
        files: closure
            .entries
            .values()
            .filter(|e| matches!(e, Entry::File(_)))
            .count(),
        file_bytes,
    })
}

/// Writes the closure as a newc cpio stream: parent directories first, files with their
/// package's permissions, symlinks as symlinks.
pub fn write_archive<W: Write>(out: W, closure: &Closure) -> Result<W, Error> {
    let mut w = CpioWriter::new(out);
    let mut dirs = BTreeSet::new();
    for (path, entry) in &closure.entries {
        let rel = path.trim_start_matches('/');
        let mut cur = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            if dirs.insert(cur.clone()) {
                w.dir(&cur, 0o755)?;
            }
        }
        match entry {
            Entry::Symlink(target) => w.symlink(rel, target)?,
            Entry::File(host) => {
                let data = std::fs::read(host).map_err(io("reading", host))?;
                let mode = std::fs::metadata(host)
                    .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
                    .unwrap_or(0o644);
                w.file(rel, mode, &data)?;
            }
        }
    }
    Ok(w.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_of_several_packages() {
        let text = "fio\n  Depends: libaio1\n  PreDepends: libc6\n |Depends: libgfapi0\n  \
                    Depends: libalt\n  Depends: <virtual-thing>\n    provider\n  Suggests: gnuplot\n\
                    iperf3\n  Depends: libiperf0\n  Depends: libc6:amd64\n";
        let deps = parse_depends(text);
        assert_eq!(deps["fio"], ["libaio1", "libc6", "libgfapi0"]);
        assert_eq!(deps["iperf3"], ["libiperf0", "libc6:amd64"]);
    }

    #[test]
    fn parses_sections() {
        let text =
            "Package: zlib1g\nVersion: 1\nSection: libs\n\nPackage: python3\nSection: python\n";
        let s = parse_sections(text);
        assert_eq!(s["zlib1g"], "libs");
        assert_eq!(s["python3"], "python");
    }

    #[test]
    fn archive_has_parents_links_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("mke2fs");
        std::fs::write(&bin, b"\x7fELF not really").unwrap();
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let mut closure = Closure::default();
        closure
            .entries
            .insert("/sbin/mke2fs".into(), Entry::File(bin));
        closure
            .entries
            .insert("/sbin/mkfs.ext4".into(), Entry::Symlink("mke2fs".into()));
        let bytes = write_archive(Vec::new(), &closure).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        // newc: mode is the second field (after the 6-byte magic and 8-digit inode).
        let mode_of = |name: &str| {
            let at = text.find(&format!("{name}\0")).unwrap();
            let hdr = text[..at].rfind("070701").unwrap();
            u32::from_str_radix(&text[hdr + 14..hdr + 22], 16).unwrap()
        };
        assert_eq!(mode_of("sbin"), 0o040755);
        assert_eq!(mode_of("sbin/mke2fs"), 0o100755);
        assert_eq!(mode_of("sbin/mkfs.ext4") & 0o170000, 0o120000);
        assert!(text.find("sbin\0").unwrap() < text.find("sbin/mke2fs\0").unwrap());
    }
}
