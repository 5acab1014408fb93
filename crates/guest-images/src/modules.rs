//! Kernel modules: the module index of a `/lib/modules/<version>` tree, `modules.dep` and
//! `modules.builtin` parsing, `.modinfo` dependencies (Debian's kernel packages ship no
//! `modules.dep`: depmod runs in their postinst), load ordering, and decompression of
//! `.ko.xz` / `.ko.zst` / `.ko.gz` files so busybox `insmod` can load them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Errors about kernel modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("module dependency cycle through {0}: modules.dep is corrupt")]
    Cycle(String),
    #[error("module {module} depends on {dependency}, which is neither a module file nor built in")]
    MissingDependency { module: String, dependency: String },
    #[error("reading module {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {path} is not a valid kernel module: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("scanning module tree {path}: {source} (is the kernel package extracted?)")]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Canonical module name: file stem without `.ko[.xz|.zst|.gz]`, `-` replaced by `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    stem.replace('-', "_")
}

/// Parses `modules.dep`: `kernel/x/a.ko: kernel/y/b.ko kernel/z/c.ko` per line.
/// Returns module name -> (path relative to the module dir, dependency names).
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, (String, Vec<String>)> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let path = path.trim();
            if path.is_empty() {
                return None;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            Some((module_name(path), (path.to_owned(), deps)))
        })
        .collect()
}

/// Parses `modules.builtin` (one `kernel/.../name.ko` per line) into module names.
pub fn parse_modules_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect()
}

/// The `depends=` list from a module's `.modinfo` section.
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    crate::elf::check_elf64_le(ko)?;
    let modinfo = crate::elf::section(ko, ".modinfo").ok_or("no .modinfo section")?;
    let mut deps = Vec::new();
    for value in modinfo
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
    {
        for d in String::from_utf8_lossy(value).split(',') {
            if !d.is_empty() {
                deps.push(d.replace('-', "_"));
            }
        }
    }
    Ok(deps)
}

/// Looks up a module's dependencies: `Ok(None)` if no module file has that name.
pub type DepsLookup<'a, E> = dyn FnMut(&str) -> Result<Option<Vec<String>>, E> + 'a;

/// Result of [`load_order`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadPlan {
    /// Modules to insmod, dependencies first.
    pub order: Vec<String>,
    /// Requested (or needed) modules that are compiled into the kernel.
    pub builtin: Vec<String>,
    /// Requested modules that exist neither as a file nor built in.
    pub missing: Vec<String>,
}

/// Orders `wanted` modules and their dependencies so each comes after what it needs.
///
/// `deps_of(name)` returns `Ok(None)` when no module file of that name exists. A missing
/// *requested* module is reported in [`LoadPlan::missing`]; a missing *dependency* is an
/// error, since the dependent module could not be loaded.
pub fn load_order<E: From<ModuleError>>(
    wanted: &[&str],
    builtin: &BTreeSet<String>,
    deps_of: &mut DepsLookup<'_, E>,
) -> Result<LoadPlan, E> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    let mut plan = LoadPlan::default();
    let mut marks: BTreeMap<String, Mark> = BTreeMap::new();
    // Iterative DFS: (name, dependencies still to visit, parent for error messages).
    for &root in wanted {
        let root = root.replace('-', "_");
        if marks.contains_key(&root) || plan.builtin.contains(&root) || plan.missing.contains(&root)
        {
            continue;
        }
        if builtin.contains(&root) {
            plan.builtin.push(root);
            continue;
        }
        let Some(deps) = deps_of(&root)? else {
            plan.missing.push(root);
            continue;
        };
        marks.insert(root.clone(), Mark::Visiting);
        let mut stack: Vec<(String, std::vec::IntoIter<String>)> = vec![(root, deps.into_iter())];
        while let Some((name, iter)) = stack.last_mut() {
            match iter.next() {
                None => {
                    let name = name.clone();
                    stack.pop();
                    marks.insert(name.clone(), Mark::Done);
                    plan.order.push(name);
                }
                Some(dep) => {
                    match marks.get(&dep) {
                        Some(Mark::Done) => continue,
                        Some(Mark::Visiting) => return Err(ModuleError::Cycle(dep).into()),
                        None => {}
                    }
                    if builtin.contains(&dep) {
                        if !plan.builtin.contains(&dep) {
                            plan.builtin.push(dep);
                        }
                        continue;
                    }
                    let module = name.clone();
                    let Some(sub) = deps_of(&dep)? else {
                        return Err(ModuleError::MissingDependency {
                            module,
                            dependency: dep,
                        }
                        .into());
                    };
                    marks.insert(dep.clone(), Mark::Visiting);
                    stack.push((dep, sub.into_iter()));
                }
            }
        }
    }
    Ok(plan)
}

/// The modules of one kernel, as extracted from its package.
#[derive(Debug)]
pub struct ModuleTree {
    /// `.../lib/modules/<version>`.
    pub root: PathBuf,
    /// Module name -> path relative to `root` (possibly compressed).
    pub files: BTreeMap<String, String>,
    /// Names of built-in modules.
    pub builtin: BTreeSet<String>,
    /// Parsed `modules.dep`, if the tree has one.
    pub dep: Option<BTreeMap<String, (String, Vec<String>)>>,
}

impl ModuleTree {
    /// Indexes the module files under `root/kernel` (and `root/updates`, `root/extra`).
    pub fn scan(root: &Path) -> Result<Self, ModuleError> {
        let read_opt = |name: &str| std::fs::read_to_string(root.join(name)).ok();
        let builtin = read_opt("modules.builtin")
            .map(|t| parse_modules_builtin(&t))
            .unwrap_or_default();
        let dep = read_opt("modules.dep").map(|t| parse_modules_dep(&t));
        let mut files = BTreeMap::new();
        let mut found_dir = false;
        for top in ["kernel", "updates", "extra"] {
            let dir = root.join(top);
            if dir.is_dir() {
                found_dir = true;
                walk(root, &dir, &mut files)?;
            }
        }
        if !found_dir {
            return Err(ModuleError::Scan {
                path: root.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no kernel/ directory"),
            });
        }
        Ok(Self {
            root: root.to_owned(),
            files,
            builtin,
            dep,
        })
    }

    /// Dependencies of `name` (from modules.dep, else from the module's `.modinfo`), or
    /// `None` if there is no such module file.
    pub fn deps_of(&self, name: &str) -> Result<Option<Vec<String>>, ModuleError> {
        if let Some(dep) = &self.dep {
            if let Some((_, deps)) = dep.get(name) {
                return Ok(Some(deps.clone()));
            }
        }
        let Some(rel) = self.files.get(name) else {
            return Ok(None);
        };
        let ko = self.read_uncompressed(name)?;
        modinfo_depends(&ko)
            .map(Some)
            .map_err(|detail| ModuleError::Invalid {
                path: self.root.join(rel),
                detail,
            })
    }

    /// Orders `wanted` and their dependencies for loading.
    pub fn plan(&self, wanted: &[&str]) -> Result<LoadPlan, ModuleError> {
        load_order(wanted, &self.builtin, &mut |n| self.deps_of(n))
    }

    /// The module's ELF bytes, decompressed if stored as `.ko.xz`/`.ko.zst`/`.ko.gz`.
    pub fn read_uncompressed(&self, name: &str) -> Result<Vec<u8>, ModuleError> {
        let rel = self.files.get(name).ok_or_else(|| ModuleError::Invalid {
            path: self.root.join(name),
            detail: "no such module file".to_owned(),
        })?;
        let path = self.root.join(rel);
        let raw = std::fs::read(&path).map_err(|source| ModuleError::Read {
            path: path.clone(),
            source,
        })?;
        decompress_module(&raw, rel).map_err(|detail| ModuleError::Invalid { path, detail })
    }

    /// Path of the uncompressed module relative to `root` (`.ko.xz` -> `.ko`).
    pub fn uncompressed_rel_path(&self, name: &str) -> Option<String> {
        let rel = self.files.get(name)?;
        let base = [".xz", ".zst", ".gz"]
            .iter()
            .find_map(|ext| rel.strip_suffix(ext))
            .unwrap_or(rel);
        Some(base.to_owned())
    }
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) -> Result<(), ModuleError> {
    let scan_err = |source| ModuleError::Scan {
        path: dir.to_owned(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(scan_err)?
        .collect::<Result<_, _>>()
        .map_err(scan_err)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let ft = entry.file_type().map_err(scan_err)?;
        if ft.is_dir() {
            walk(root, &path, files)?;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|e| name.ends_with(e))
        {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            files.entry(module_name(&name)).or_insert(rel);
        }
    }
    Ok(())
}

/// Decompresses a module file according to its extension (or magic), checking the
/// result is an ELF.
pub fn decompress_module(raw: &[u8], file_name: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let res = if file_name.ends_with(".xz") || raw.starts_with(b"\xfd7zXZ\x00") {
        lzma_rust2::XzReader::new(raw, true).read_to_end(&mut out)
    } else if file_name.ends_with(".zst") || raw.starts_with(b"\x28\xb5\x2f\xfd") {
        ruzstd::decoding::StreamingDecoder::new(raw)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
            .and_then(|mut d| d.read_to_end(&mut out))
    } else if file_name.ends_with(".gz") || raw.starts_with(b"\x1f\x8b") {
        flate2::read::GzDecoder::new(raw).read_to_end(&mut out)
    } else {
        out = raw.to_vec();
        Ok(0)
    };
    res.map_err(|e| format!("decompressing: {e}"))?;
    crate::elf::check_elf64_le(&out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn plan(
        g: &BTreeMap<String, Vec<String>>,
        builtin: &[&str],
        wanted: &[&str],
    ) -> Result<LoadPlan, ModuleError> {
        let builtin = builtin.iter().map(|s| s.to_string()).collect();
        load_order(wanted, &builtin, &mut |n| Ok(g.get(n).cloned()))
    }

    #[test]
    fn names() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(module_name("virtio_blk.ko.xz"), "virtio_blk");
        assert_eq!(module_name("a/b/vsock.ko.zst"), "vsock");
    }

    #[test]
    fn parses_modules_dep() {
        let text = "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
                    kernel/drivers/virtio/virtio.ko:\n\
                    \n\
                    kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko\n";
        let dep = parse_modules_dep(text);
        assert_eq!(dep.len(), 3);
        assert_eq!(
            dep["virtio_blk"],
            (
                "kernel/drivers/block/virtio_blk.ko".to_owned(),
                vec!["virtio_ring".to_owned(), "virtio".to_owned()]
            )
        );
        assert!(dep["virtio"].1.is_empty());
        assert_eq!(
            dep["virtio_rng"].0,
            "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
        );
    }

    #[test]
    fn parses_modules_builtin() {
        let b = parse_modules_builtin(
            "kernel/drivers/virtio/virtio_anchor.ko\n\nkernel/lib/crc-t10dif.ko\n",
        );
        assert!(b.contains("virtio_anchor"));
        assert!(b.contains("crc_t10dif"));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn orders_dependencies_first() {
        let g = graph(&[
            ("virtio", &[]),
            ("virtio_ring", &["virtio"]),
            ("virtio_blk", &["virtio_ring", "virtio"]),
            ("failover", &[]),
            ("net_failover", &["failover"]),
            ("virtio_net", &["net_failover", "virtio_ring", "virtio"]),
            (
                "virtio_pci",
                &["virtio_pci_modern_dev", "virtio_ring", "virtio"],
            ),
            ("virtio_pci_modern_dev", &[]),
        ]);
        let p = plan(
            &g,
            &["virtio_anchor"],
            &[
                "virtio_net",
                "virtio_blk",
                "virtio_pci",
                "virtio_blk",
                "nope",
                "virtio_anchor",
            ],
        )
        .unwrap();
        let pos = |n: &str| p.order.iter().position(|x| x == n).unwrap();
        for (n, deps) in &g {
            if p.order.contains(n) {
                for d in deps {
                    assert!(pos(d) < pos(n), "{d} must load before {n}: {:?}", p.order);
                }
            }
        }
        assert_eq!(p.order.len(), 8);
        assert_eq!(p.missing, ["nope"]);
        assert_eq!(p.builtin, ["virtio_anchor"]);
    }

    #[test]
    fn builtin_dependencies_are_skipped() {
        let g = graph(&[
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_ring", &["virtio"]),
        ]);
        let p = plan(&g, &["virtio"], &["virtio_blk"]).unwrap();
        assert_eq!(p.order, ["virtio_ring", "virtio_blk"]);
        assert_eq!(p.builtin, ["virtio"]);
    }

    #[test]
    fn missing_dependency_and_cycle_are_errors() {
        let g = graph(&[("a", &["b"])]);
        assert!(matches!(
            plan(&g, &[], &["a"]),
            Err(ModuleError::MissingDependency { .. })
        ));
        let g = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert!(matches!(plan(&g, &[], &["a"]), Err(ModuleError::Cycle(_))));
    }

    /// A relocatable ELF with a `.modinfo` section, like a real `.ko`.
    fn fake_ko(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut d = vec![0u8; 64];
        d[..4].copy_from_slice(b"\x7fELF");
        d[4] = 2;
        d[5] = 1;
        d[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        d[18..20].copy_from_slice(&62u16.to_le_bytes());
        let modinfo_off = d.len();
        d.extend_from_slice(modinfo);
        let strtab_off = d.len();
        d.extend_from_slice(shstrtab);
        while d.len() % 8 != 0 {
            d.push(0);
        }
        let shoff = d.len();
        let mut sh = |name: u32, ty: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[..4].copy_from_slice(&name.to_le_bytes());
            s[4..8].copy_from_slice(&ty.to_le_bytes());
            s[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            s[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            d.extend_from_slice(&s);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, modinfo_off, modinfo.len());
        sh(10, 3, strtab_off, shstrtab.len());
        d[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        d[58..60].copy_from_slice(&64u16.to_le_bytes());
        d[60..62].copy_from_slice(&3u16.to_le_bytes());
        d[62..64].copy_from_slice(&2u16.to_le_bytes());
        d
    }

    #[test]
    fn reads_modinfo_depends() {
        let ko =
            fake_ko(b"license=GPL\0depends=virtio_ring,virtio,net-failover\0name=virtio_net\0");
        assert_eq!(
            modinfo_depends(&ko).unwrap(),
            ["virtio_ring", "virtio", "net_failover"]
        );
        let ko = fake_ko(b"depends=\0name=virtio\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
        assert!(modinfo_depends(b"not an elf").is_err());
    }

    #[test]
    fn module_tree_without_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("kernel/drivers/virtio")).unwrap();
        std::fs::create_dir_all(root.join("kernel/drivers/block")).unwrap();
        std::fs::write(
            root.join("modules.builtin"),
            "kernel/drivers/virtio/virtio_anchor.ko\n",
        )
        .unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio.ko"),
            fake_ko(b"depends=\0"),
        )
        .unwrap();
        // A gzip-compressed module, to exercise decompression.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&fake_ko(b"depends=virtio\0")).unwrap();
        std::fs::write(
            root.join("kernel/drivers/virtio/virtio_ring.ko.gz"),
            gz.finish().unwrap(),
        )
        .unwrap();
        std::fs::write(
            root.join("kernel/drivers/block/virtio_blk.ko"),
            fake_ko(b"depends=virtio_ring,virtio,virtio_anchor\0"),
        )
        .unwrap();
        let tree = ModuleTree::scan(root).unwrap();
        assert!(tree.dep.is_none());
        let p = tree.plan(&["virtio_blk", "virtio_net"]).unwrap();
        assert_eq!(p.order, ["virtio", "virtio_ring", "virtio_blk"]);
        assert_eq!(p.builtin, ["virtio_anchor"]);
        assert_eq!(p.missing, ["virtio_net"]);
        assert_eq!(
            tree.uncompressed_rel_path("virtio_ring").unwrap(),
            "kernel/drivers/virtio/virtio_ring.ko"
        );
        assert!(
            tree.read_uncompressed("virtio_ring")
                .unwrap()
                .starts_with(b"\x7fELF")
        );
        // Corrupt module -> error, not panic.
        std::fs::write(root.join("kernel/drivers/block/virtio_blk.ko"), b"garbage").unwrap();
        assert!(matches!(
            tree.plan(&["virtio_blk"]),
            Err(ModuleError::Invalid { .. })
        ));
    }
}
