//! The files a dynamically linked program needs at run time: itself, its ELF interpreter and the
//! shared libraries named by `DT_NEEDED`, recursively, looked up the way glibc's `ld.so` does
//! (`DT_RPATH`/`DT_RUNPATH`, then the Debian multiarch system directories) inside a set of
//! extracted package trees that together form the guest's root file system.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Directories glibc's `ld.so` searches on Debian when no `ld.so.cache` exists (the guest has
/// none), in its order (`ld.so --help`).
pub const SYSTEM_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib",
    "/usr/lib",
];

/// Symlinks followed per lookup before giving up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

/// One path of the guest file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A regular file, with the host file holding its contents.
    File(PathBuf),
    /// A symbolic link, with its target as stored in the package.
    Symlink(String),
}

/// A library that no tree provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The `DT_NEEDED` (or `PT_INTERP`) name.
    pub name: String,
    /// Guest path of the object that needs it.
    pub needed_by: String,
    /// The tree (index into the trees given) holding that object.
    pub tree: usize,
}

/// What [`closure`] found.
#[derive(Debug, Clone, Default)]
pub struct Closure {
    /// Guest absolute path → entry; symlinks on the way to a file are kept as symlinks.
    pub entries: BTreeMap<String, Entry>,
    /// Needed objects found nowhere.
    pub unresolved: Vec<Unresolved>,
}

impl Closure {
    /// Sum of the sizes of the regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File(p) => std::fs::metadata(p).ok().map(|m| m.len()),
                Entry::Symlink(_) => None,
            })
            .sum()
    }
}

/// Errors of [`closure`].
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("{path} is in none of the extracted packages")]
    RootMissing { path: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid ELF file: {msg}")]
    Elf { path: PathBuf, msg: String },
    #[error("{path}: more than {MAX_SYMLINKS} symbolic links")]
    SymlinkLoop { path: String },
}

/// Parsed runtime needs by host file, kept across [`closure`] calls: a resolution that grows the
/// set of trees round by round then parses each object once.
#[derive(Debug, Default)]
pub struct ElfCache {
    needs: BTreeMap<(PathBuf, String), Option<Needs>>,
}

/// `a/b/../c` → `/a/c`, for guest paths (no file system access).
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

fn parent(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

/// The guest file system as the union of the trees (earlier trees win).
struct Union<'a> {
    trees: &'a [PathBuf],
}

/// A guest path resolved to a regular file.
struct Found {
    /// Guest path of the file itself (after symlinks).
    path: String,
    host: PathBuf,
    tree: usize,
}

impl Union<'_> {
    /// Resolves `path`, recording every symlink passed in `entries`. `Ok(None)` when no tree
    /// has it.
    fn resolve(
        &self,
        path: &str,
        entries: &mut BTreeMap<String, Entry>,
    ) -> Result<Option<Found>, ClosureError> {
        let mut path = normalize(path);
        for _ in 0..MAX_SYMLINKS {
            let rel = path.trim_start_matches('/');
            let mut next = None;
            for (tree, root) in self.trees.iter().enumerate() {
                let host = root.join(rel);
                let Ok(meta) = std::fs::symlink_metadata(&host) else {
                    continue;
                };
                if meta.file_type().is_symlink() {
                    let target = std::fs::read_link(&host).map_err(|source| ClosureError::Io {
                        path: host.clone(),
                        source,
                    })?;
                    let target = target.to_string_lossy().into_owned();
                    entries.insert(path.clone(), Entry::Symlink(target.clone()));
                    next = Some(if target.starts_with('/') {
                        normalize(&target)
                    } else {
                        normalize(&format!("{}/{target}", parent(&path)))
                    });
                    break;
                }
                if meta.is_file() {
                    return Ok(Some(Found { path, host, tree }));
                }
            }
            match next {
                Some(n) => path = n,
                None => return Ok(None),
            }
        }
        Err(ClosureError::SymlinkLoop { path })
    }
}

/// Directories named by a `DT_RUNPATH`/`DT_RPATH` string, with `$ORIGIN` expanded to the guest
/// directory of the object.
fn expand_search_path(list: &str, origin: &str) -> Vec<String> {
    list.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin))
        .collect()
}

/// Runtime needs of one object: (interpreter, needed names, search directories before the
/// system ones). `None` for a file that is not ELF (a config file, a script).
type Needs = (Option<String>, Vec<String>, Vec<String>);

fn needs_of(host: &Path, guest_path: &str) -> Result<Option<Needs>, ClosureError> {
    let data = std::fs::read(host).map_err(|source| ClosureError::Io {
        path: host.to_owned(),
        source,
    })?;
    if !data.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let elf = goblin::elf::Elf::parse(&data).map_err(|e| ClosureError::Elf {
        path: host.to_owned(),
        msg: e.to_string(),
    })?;
    let origin = parent(guest_path);
    // ld.so ignores DT_RPATH when DT_RUNPATH is present.
    let search = if elf.runpaths.is_empty() {
        &elf.rpaths
    } else {
        &elf.runpaths
    };
    let dirs = search
        .iter()
        .flat_map(|s| expand_search_path(s, origin))
        .collect();
    Ok(Some((
        elf.interpreter.map(str::to_owned),
        elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
        dirs,
    )))
}

/// Everything `roots` (guest absolute paths: programs, also plain data files) need, found in
/// `trees` (directories each holding an extracted package, earlier ones win).
pub fn closure(
    trees: &[PathBuf],
    roots: &[&str],
    cache: &mut ElfCache,
) -> Result<Closure, ClosureError> {
    let fs = Union { trees };
    let mut out = Closure::default();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<Found> = VecDeque::new();
    for root in roots {
        let found =
            fs.resolve(root, &mut out.entries)?
                .ok_or_else(|| ClosureError::RootMissing {
                    path: (*root).to_owned(),
                })?;
        queue.push_back(found);
    }
    while let Some(obj) = queue.pop_front() {
        if !done.insert(obj.path.clone()) {
            continue;
        }
        out.entries
            .insert(obj.path.clone(), Entry::File(obj.host.clone()));
        let key = (obj.host.clone(), obj.path.clone());
        let needs = match cache.needs.get(&key) {
            Some(n) => n.clone(),
            None => {
                let n = needs_of(&obj.host, &obj.path)?;
                cache.needs.insert(key, n.clone());
                n
            }
        };
        let Some((interp, needed, dirs)) = needs else {
            continue;
        };
        let mut want: Vec<(String, Vec<String>)> = Vec::new();
        if let Some(i) = interp {
            want.push((i.clone(), vec![i]));
        }
        for name in needed {
            let candidates = if name.contains('/') {
                vec![name.clone()]
            } else {
                dirs.iter()
                    .map(String::as_str)
                    .chain(SYSTEM_LIB_DIRS.iter().copied())
                    .map(|d| format!("{d}/{name}"))
                    .collect()
            };
            want.push((name, candidates));
        }
        for (name, candidates) in want {
            let mut hit = None;
            for c in &candidates {
                // Symlinks of misses are not kept: only the path that works goes in.
                let mut links = BTreeMap::new();
                if let Some(f) = fs.resolve(c, &mut links)? {
                    out.entries.extend(links);
                    hit = Some(f);
                    break;
                }
            }
            match hit {
                Some(f) => queue.push_back(f),
                None => {
                    let u = Unresolved {
                        name,
                        needed_by: obj.path.clone(),
                        tree: obj.tree,
                    };
                    if !out.unresolved.contains(&u) {
                        out.unresolved.push(u);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_guest_paths() {
        assert_eq!(normalize("/lib/../usr/./lib//x.so"), "/usr/lib/x.so");
        assert_eq!(normalize("../../etc"), "/etc");
        assert_eq!(parent("/usr/bin/fio"), "/usr/bin");
        assert_eq!(parent("/init"), "/");
        assert_eq!(
            expand_search_path("$ORIGIN/../lib:/opt/x::${ORIGIN}", "/usr/bin"),
            ["/usr/bin/../lib", "/opt/x", "/usr/bin"]
        );
    }

    /// Real ELF files: the host's own `/bin/sh` (dynamically linked on Debian) and its libc,
    /// laid out as two "packages", one with the loader behind an absolute symlink.
    #[test]
    fn follows_needed_and_symlinks_across_trees() {
        let sh = Path::new("/bin/sh");
        let Ok(data) = std::fs::read(sh) else {
            eprintln!("skipping: no /bin/sh");
            return;
        };
        let Ok(elf) = goblin::elf::Elf::parse(&data) else {
            eprintln!("skipping: /bin/sh is not ELF");
            return;
        };
        let (Some(interp), false) = (elf.interpreter, elf.libraries.is_empty()) else {
            eprintln!("skipping: /bin/sh is static");
            return;
        };
        let interp = interp.to_owned();
        let interp_name = interp.rsplit('/').next().unwrap().to_owned();
        let libs: Vec<String> = elf.libraries.iter().map(|s| s.to_string()).collect();
        let tmp = tempfile::tempdir().unwrap();
        let prog = tmp.path().join("prog");
        let libc = tmp.path().join("libc");
        std::fs::create_dir_all(prog.join("usr/bin")).unwrap();
        std::fs::copy(sh, prog.join("usr/bin/sh")).unwrap();
        std::fs::write(prog.join("usr/bin/notes.txt"), "plain").unwrap();
        // The loader lives in the second tree behind an absolute symlink, as in libc6.
        let real_dir = libc.join("lib/x86_64-linux-gnu");
        std::fs::create_dir_all(&real_dir).unwrap();
        std::fs::copy(&interp, real_dir.join(&interp_name)).unwrap();
        let interp_host = libc.join(interp.trim_start_matches('/'));
        if !interp_host.exists() {
            std::fs::create_dir_all(interp_host.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(
                format!("/lib/x86_64-linux-gnu/{interp_name}"),
                &interp_host,
            )
            .unwrap();
        }
        // The libraries behind relative symlinks to versioned names, as in lib packages.
        for lib in &libs {
            let host_lib = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"]
                .iter()
                .map(|d| Path::new(d).join(lib))
                .find(|p| p.exists());
            let Some(host_lib) = host_lib else {
                eprintln!("skipping: {lib} not in the multiarch dirs");
                return;
            };
            std::fs::copy(&host_lib, real_dir.join(format!("{lib}.9.9"))).unwrap();
            std::os::unix::fs::symlink(format!("{lib}.9.9"), real_dir.join(lib)).unwrap();
        }
        let trees = vec![prog.clone(), libc.clone()];
        let roots = ["/usr/bin/sh", "/usr/bin/notes.txt"];
        let c = closure(&trees, &roots, &mut ElfCache::default()).unwrap();
        if c.unresolved.iter().any(|u| !libs.contains(&u.name)) {
            eprintln!(
                "skipping: the host's libraries need more: {:?}",
                c.unresolved
            );
            return;
        }
        assert_eq!(c.unresolved, []);
        assert_eq!(
            c.entries
                .get(&format!("/lib/x86_64-linux-gnu/{interp_name}")),
            Some(&Entry::File(real_dir.join(&interp_name)))
        );
        let first = format!("/lib/x86_64-linux-gnu/{}", libs[0]);
        assert_eq!(
            c.entries.get(&first),
            Some(&Entry::Symlink(format!("{}.9.9", libs[0])))
        );
        assert!(c.entries.contains_key(&format!("{first}.9.9")));
        assert!(matches!(
            c.entries.get("/usr/bin/notes.txt"),
            Some(Entry::File(_))
        ));
        assert!(c.file_bytes() > 0);
        // A library taken away is reported as needed by the program, from tree 0.
        std::fs::remove_file(real_dir.join(&libs[0])).unwrap();
        let c = closure(&trees, &roots, &mut ElfCache::default()).unwrap();
        assert_eq!(
            c.unresolved,
            [Unresolved {
                name: libs[0].clone(),
                needed_by: "/usr/bin/sh".into(),
                tree: 0
            }]
        );
        assert!(matches!(
            closure(&trees, &["/usr/bin/missing"], &mut ElfCache::default()),
            Err(ClosureError::RootMissing { .. })
        ));
    }
}
