//! qcow2 images, read/write, with backing files (so many VMs share one base copy-on-write), on the
//! `imago` crate (its synchronous build).
//!
//! We check the header ourselves before `imago` sees it, so bad input gets one clear message:
//! wrong magic or version, encryption, an external data file, and incompatible features we do not
//! know (dirty, corrupt, zstd, extended L2) are refused. The image is locked like a raw image
//! (`flock` exclusive when writable, shared when read-only); the backing chain is opened
//! read-only with shared locks, relative names resolved against the directory of the image that
//! names them. Backing images may be raw or qcow2 (at most [`MAX_CHAIN`] deep).
//!
//! Reads and writes share a read lock on the image; DISCARD (which may free clusters that another
//! request is using) takes the write lock. FLUSH writes `imago`'s cached metadata and then
//! `fdatasync`s the image.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder, StorageOpenOptions};

use super::backend::DiskBackend;
use super::raw::{DiskError, open_locked};
use super::request::SECTOR_SIZE;

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The longest backing chain we follow (it also stops loops).
pub const MAX_CHAIN: usize = 16;
/// The largest virtual size we accept (qemu's limit is 2^61 - 1 bytes; ours keeps sector
/// arithmetic well inside u64).
const MAX_SIZE: u64 = 1 << 60;

/// Incompatible feature bits (qcow2 spec, header bytes 72..80).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("qcow2 image {}: corrupt header: {why}", .path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("qcow2 image {}: unsupported: {what}", .path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("qcow2 image {}: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("qcow2 image {}: backing file: {source}", .path.display())]
    Backing {
        path: PathBuf,
        source: Box<Qcow2Error>,
    },
}

/// Whether the file at `path` starts with the qcow2 magic (false if it cannot be read: opening it
/// as a raw image then reports why).
pub fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 0))
        .is_ok_and(|()| magic == MAGIC)
}

/// Whether a qcow2 file's header names a backing file (false if it cannot be read).
pub fn names_backing_file(path: &Path) -> bool {
    let mut head = [0u8; 20];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .is_ok_and(|()| be64(&head, 8) != 0 && be32(&head, 16) != 0)
}

/// What the header says, after our checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u32,
    pub size: u64,
    pub cluster_bits: u32,
    pub backing: Option<String>,
    /// Where the refcount table starts (cluster-aligned, inside the file).
    pub refcount_table_offset: u64,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap_or_default())
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap_or_default())
}

/// Checks a qcow2 header. `first` is the start of the file (up to one cluster, at least what the
/// header needs; shorter input is corrupt), `file_len` the file's length (the L1 and refcount
/// tables must lie inside it). `Err(Ok(why))` is a corrupt header, `Err(Err(what))` an
/// unsupported feature.
pub fn check_header(first: &[u8], file_len: u64) -> Result<HeaderInfo, Result<String, String>> {
    let corrupt = |why: &str| Err(Ok(why.to_owned()));
    if first.len() < 72 {
        return corrupt("shorter than a qcow2 header");
    }
    if first[..4] != MAGIC {
        return corrupt("no qcow2 magic");
    }
    let version = be32(first, 4);
    if version != 2 && version != 3 {
        return Err(Err(format!("qcow2 version {version}")));
    }
    let backing_offset = be64(first, 8);
    let backing_len = be32(first, 16);
    let cluster_bits = be32(first, 20);
    let size = be64(first, 24);
    let crypt = be32(first, 32);
    if !(9..=21).contains(&cluster_bits) {
        return corrupt(&format!("cluster_bits {cluster_bits} (must be 9..=21)"));
    }
    if size > MAX_SIZE {
        return corrupt(&format!("virtual size {size} is too large"));
    }
    if crypt != 0 {
        return Err(Err(format!("encryption (method {crypt})")));
    }
    let cluster = 1u64 << cluster_bits;
    // Each L1 entry maps an L2 table of cluster/8 entries of one cluster each.
    let per_l1 = (cluster / 8) << cluster_bits;
    let l1_size = u64::from(be32(first, 36));
    let l1_offset = be64(first, 40);
    let rt_offset = be64(first, 48);
    let rt_clusters = u64::from(be32(first, 56));
    if l1_size < size.div_ceil(per_l1) {
        return corrupt(&format!("L1 table of {l1_size} entries is too small"));
    }
    let inside = |offset: u64, len: u64| {
        offset % cluster == 0
            && offset != 0
            && offset.checked_add(len).is_some_and(|e| e <= file_len)
    };
    if l1_size != 0 && !inside(l1_offset, l1_size * 8) {
        return corrupt(&format!(
            "L1 table at {l1_offset:#x} is misaligned or outside the file"
        ));
    }
    if rt_clusters == 0 || !inside(rt_offset, rt_clusters << cluster_bits) {
        return corrupt(&format!(
            "refcount table at {rt_offset:#x} is empty, misaligned or outside the file"
        ));
    }
    if version == 3 {
        if first.len() < 104 {
            return corrupt("shorter than a qcow2 v3 header");
        }
        let incompat = be64(first, 72);
        let named = [
            (
                INCOMPAT_DIRTY,
                "dirty refcounts (run `qemu-img check -r all`)",
            ),
            (INCOMPAT_CORRUPT, "marked corrupt (run `qemu-img check`)"),
            (INCOMPAT_DATA_FILE, "external data file"),
            (INCOMPAT_COMPRESSION, "compression type other than deflate"),
            (INCOMPAT_EXTL2, "extended L2 entries (subclusters)"),
        ];
        if let Some((_, what)) = named.iter().find(|(bit, _)| incompat & bit != 0) {
            return Err(Err((*what).to_owned()));
        }
        if incompat != 0 {
            return Err(Err(format!("incompatible features {incompat:#x}")));
        }
    }
    let backing = if backing_offset != 0 && backing_len != 0 {
        if backing_len > 1023 {
            return corrupt("backing file name longer than 1023 bytes");
        }
        let name = usize::try_from(backing_offset)
            .ok()
            .and_then(|start| first.get(start..start.checked_add(backing_len as usize)?));
        let Some(name) = name else {
            return corrupt("backing file name outside the first cluster");
        };
        match std::str::from_utf8(name) {
            Ok(s) => Some(s.to_owned()),
            Err(_) => return corrupt("backing file name is not UTF-8"),
        }
    } else {
        None
    };
    Ok(HeaderInfo {
        version,
        size,
        cluster_bits,
        backing,
        refcount_table_offset: rt_offset,
    })
}

/// Bits of a refcount table entry that hold the refcount block's offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Checks the refcount table's first entry, `entry`: the refcount block covering the header
/// cluster must exist (cluster-aligned, inside the file), as it does in every image qemu writes.
/// Without it `imago` places a new block over cluster 0, whose offset 0 then reads back as "no
/// block", and its next allocation recurses until the stack overflows.
pub fn check_first_refblock(entry: u64, cluster_bits: u32, file_len: u64) -> Result<(), String> {
    let offset = entry & REFT_OFFSET_MASK;
    let cluster = 1u64 << cluster_bits;
    if offset == 0
        || offset % cluster != 0
        || offset.checked_add(cluster).is_none_or(|e| e > file_len)
    {
        return Err(format!(
            "refcount table entry 0 ({entry:#x}) is not a refcount block inside the file"
        ));
    }
    Ok(())
}

fn storage(file: File, path: &Path, writable: bool) -> io::Result<ImagoFile> {
    ImagoFile::from_open_file(
        file,
        StorageOpenOptions::new().write(writable).filename(path),
    )
}

/// Reads the header cluster's worth that [`check_header`] needs (the first 64 KiB at most).
fn read_head(file: &File, path: &Path) -> Result<Vec<u8>, Qcow2Error> {
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Qcow2Error::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Opens a qcow2 image (and its backing chain); `depth` is its place in the chain.
fn open_qcow2(
    path: &Path,
    writable: bool,
    depth: usize,
) -> Result<(FormatAccess<ImagoFile>, File, HeaderInfo), Qcow2Error> {
    let file = open_locked(path, !writable)?;
    let head = read_head(&file, path)?;
    // Seeking to the end also sizes block devices (whose metadata length is 0).
    let len = (&file)
        .seek(SeekFrom::End(0))
        .map_err(|source| Qcow2Error::Open {
            path: path.to_owned(),
            source,
        })?;
    let info = check_header(&head, len).map_err(|e| match e {
        Ok(why) => Qcow2Error::Corrupt {
            path: path.to_owned(),
            why,
        },
        Err(what) => Qcow2Error::Unsupported {
            path: path.to_owned(),
            what,
        },
    })?;
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, info.refcount_table_offset)
        .map_err(|source| Qcow2Error::Open {
            path: path.to_owned(),
            source,
        })?;
    check_first_refblock(u64::from_be_bytes(entry), info.cluster_bits, len).map_err(|why| {
        Qcow2Error::Corrupt {
            path: path.to_owned(),
            why,
        }
    })?;
    let sync_fd = file.try_clone().map_err(|source| Qcow2Error::Open {
        path: path.to_owned(),
        source,
    })?;
    let corrupt = |e: io::Error| Qcow2Error::Corrupt {
        path: path.to_owned(),
        why: e.to_string(),
    };
    let mut image = Qcow2::<ImagoFile>::open_image(
        storage(file, path, writable).map_err(|source| Qcow2Error::Open {
            path: path.to_owned(),
            source,
        })?,
        writable,
    )
    .map_err(corrupt)?;
    if image.requires_external_data_file() {
        return Err(Qcow2Error::Unsupported {
            path: path.to_owned(),
            what: "external data file".into(),
        });
    }
    image.set_data_file(None);
    let backing = match &info.backing {
        None => None,
        Some(name) => {
            let format = image.implicit_backing_format().cloned();
            Some(
                open_backing(path, name, format.as_deref(), depth + 1).map_err(|source| {
                    Qcow2Error::Backing {
                        path: path.to_owned(),
                        source: Box::new(source),
                    }
                })?,
            )
        }
    };
    image.set_backing(backing);
    Ok((FormatAccess::new(image), sync_fd, info))
}

/// Opens backing file `name` of the image at `child` read-only, as raw or qcow2 (from the
/// header's format extension, else from the file's magic).
fn open_backing(
    child: &Path,
    name: &str,
    format: Option<&str>,
    depth: usize,
) -> Result<FormatAccess<ImagoFile>, Qcow2Error> {
    let path = match child.parent() {
        Some(dir) if Path::new(name).is_relative() => dir.join(name),
        _ => PathBuf::from(name),
    };
    if depth > MAX_CHAIN {
        return Err(Qcow2Error::Unsupported {
            path,
            what: format!("backing chain longer than {MAX_CHAIN} images (a loop?)"),
        });
    }
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(Qcow2Error::Unsupported {
                path,
                what: format!("backing file format '{other}'"),
            });
        }
        None => is_qcow2(&path),
    };
    if qcow2 {
        return open_qcow2(&path, false, depth).map(|(image, _, _)| image);
    }
    let file = open_locked(&path, true)?;
    let open_err = |source| Qcow2Error::Open {
        path: path.clone(),
        source,
    };
    let raw = Raw::builder(storage(file, &path, false).map_err(open_err)?)
        .write(false)
        .open(DenyImplicitOpenGate::default())
        .map_err(open_err)?;
    Ok(FormatAccess::new(raw))
}

/// A qcow2 image.
#[derive(Debug)]
pub struct Qcow2File {
    image: RwLock<FormatAccess<ImagoFile>>,
    /// The image file (the same open file as `image`'s), for `fdatasync`.
    file: File,
    size: u64,
    info: HeaderInfo,
}

fn poisoned() -> io::Error {
    io::Error::other("qcow2 image lock poisoned")
}

impl Qcow2File {
    /// Opens and locks `path` and its backing chain; the virtual size (rounded down to whole
    /// sectors) is the disk's.
    pub fn open(path: &Path, readonly: bool) -> Result<Self, Qcow2Error> {
        let (image, file, info) = open_qcow2(path, !readonly, 0)?;
        let size = image.size() - image.size() % SECTOR_SIZE;
        if size == 0 {
            return Err(DiskError::Empty {
                path: path.to_owned(),
            }
            .into());
        }
        if size != image.size() {
            tracing::warn!(
                "qcow2 image {}: the last {} bytes are not a whole sector and are not visible",
                path.display(),
                image.size() - size
            );
        }
        Ok(Self {
            image: RwLock::new(image),
            file,
            size,
            info,
        })
    }

    /// The header as checked at open time.
    pub fn header(&self) -> &HeaderInfo {
        &self.info
    }
}

impl DiskBackend for Qcow2File {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read().map_err(|_| poisoned())?.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image
            .read()
            .map_err(|_| poisoned())?
            .write(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.image.read().map_err(|_| poisoned())?.flush()?;
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self
            .image
            .write()
            .map_err(|_| poisoned())?
            .discard_to_any(offset, len)
        {
            // Discard is a hint.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if may_unmap {
            self.image
                .write()
                .map_err(|_| poisoned())?
                .discard_to_zero(offset, len)
        } else {
            self.image
                .read()
                .map_err(|_| poisoned())?
                .write_zeroes(offset, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Whether `qemu-img` runs; without it the tests skip, except in CI where they fail.
    fn qemu_img_available() -> bool {
        let ok = Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is needed in CI (apt-get install qemu-utils)"
            );
            eprintln!("qemu-img not found: skipping");
        }
        ok
    }

    fn qemu_img(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    const SIZE: u64 = 4 << 20;

    /// A raw base of `SIZE` bytes with a recognisable byte per 512-byte sector, and a qcow2
    /// overlay naming it by a relative path.
    fn base_and_overlay(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        let base: Vec<u8> = (0..SIZE).map(|i| (i / 512 % 251) as u8 + 1).collect();
        let base_path = dir.join("base.raw");
        std::fs::write(&base_path, &base).unwrap();
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "overlay.qcow2",
            ],
        );
        (base_path, dir.join("overlay.qcow2"), base)
    }

    fn read(disk: &Qcow2File, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        disk.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn assert_check_clean(dir: &Path, image: &str) {
        let out = qemu_img(dir, &["check", image]);
        assert!(out.contains("No errors were found"), "{out}");
    }

    #[test]
    fn overlay_reads_base_and_writes_stay_in_overlay() {
        if !qemu_img_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base_path, overlay, base) = base_and_overlay(dir.path());
        let disk = Qcow2File::open(&overlay, false).unwrap();
        assert_eq!(disk.size(), SIZE);
        assert_eq!(disk.header().backing.as_deref(), Some("base.raw"));
        assert_eq!(read(&disk, 0, SIZE as usize), base);

        // Unaligned to clusters, across a cluster boundary.
        let data = vec![0xabu8; 3 * 512];
        disk.write_at(&data, 65536 - 512).unwrap();
        let mut expect = base.clone();
        expect[65536 - 512..65536 + 1024].copy_from_slice(&data);
        assert_eq!(read(&disk, 0, SIZE as usize), expect);
        disk.flush().unwrap();
        drop(disk);

        assert_eq!(std::fs::read(&base_path).unwrap(), base, "base changed");
        assert_check_clean(dir.path(), "overlay.qcow2");
        qemu_img(
            dir.path(),
            &["convert", "-O", "raw", "overlay.qcow2", "out.raw"],
        );
        assert_eq!(std::fs::read(dir.path().join("out.raw")).unwrap(), expect);

        // What was flushed is there when the image is opened again.
        let disk = Qcow2File::open(&overlay, true).unwrap();
        assert_eq!(read(&disk, 0, SIZE as usize), expect);
        assert!(disk.write_at(&[0; 512], 0).is_err(), "read-only image");
    }

    #[test]
    fn write_zeroes_and_discard() {
        if !qemu_img_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base_path, overlay, base) = base_and_overlay(dir.path());
        let disk = Qcow2File::open(&overlay, false).unwrap();
        disk.write_zeroes(0, 4096, false).unwrap();
        disk.write_zeroes(1 << 20, 256 << 10, true).unwrap();
        disk.write_at(&[7u8; 8192], 2 << 20).unwrap();
        disk.discard(2 << 20, 128 << 10).unwrap();
        assert!(read(&disk, 0, 4096).iter().all(|&b| b == 0));
        assert!(read(&disk, 1 << 20, 256 << 10).iter().all(|&b| b == 0));
        assert_eq!(read(&disk, 4096, 4096), base[4096..8192]);
        assert_eq!(read(&disk, 3 << 20, 4096), base[3 << 20..(3 << 20) + 4096]);
        disk.flush().unwrap();
        drop(disk);
        assert_eq!(std::fs::read(&base_path).unwrap(), base, "base changed");
        assert_check_clean(dir.path(), "overlay.qcow2");
    }

    #[test]
    fn qcow2_backing_chain_and_standalone_image() {
        if !qemu_img_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_, _, base) = base_and_overlay(dir.path());
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "overlay.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        let top = Qcow2File::open(&dir.path().join("top.qcow2"), false).unwrap();
        assert_eq!(read(&top, 0, SIZE as usize), base);
        top.write_at(&[1u8; 512], 512).unwrap();
        top.flush().unwrap();
        // The middle image is shared-locked: it cannot be opened writable meanwhile.
        let e = Qcow2File::open(&dir.path().join("overlay.qcow2"), false).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        drop(top);

        qemu_img(
            dir.path(),
            &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"],
        );
        let plain = Qcow2File::open(&dir.path().join("plain.qcow2"), false).unwrap();
        assert_eq!(plain.size(), 1 << 20);
        assert!(read(&plain, 0, 1 << 20).iter().all(|&b| b == 0));
    }

    #[test]
    fn locks_like_raw_images() {
        if !qemu_img_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base_path, overlay, _) = base_and_overlay(dir.path());
        let disk = Qcow2File::open(&overlay, false).unwrap();
        let e = Qcow2File::open(&overlay, true).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        // The base is shared: readers are welcome, writers are not.
        super::super::RawFile::open(&base_path, true).unwrap();
        let e = super::super::RawFile::open(&base_path, false).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
        drop(disk);
        super::super::RawFile::open(&base_path, false).unwrap();
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        if !qemu_img_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (base_path, overlay, _) = base_and_overlay(dir.path());
        let good = std::fs::read(&overlay).unwrap();
        let refused = |bytes: &[u8], needle: &str| {
            let p = dir.path().join("bad.qcow2");
            std::fs::write(&p, bytes).unwrap();
            let e = Qcow2File::open(&p, false).unwrap_err().to_string();
            assert!(e.contains(needle), "expected '{needle}' in: {e}");
            assert!(e.contains("bad.qcow2") && !e.contains('\n'), "{e}");
        };
        let patched = |off: usize, val: &[u8]| {
            let mut b = good.clone();
            b[off..off + val.len()].copy_from_slice(val);
            b
        };
        refused(&good[..40], "corrupt header");
        refused(&patched(4, &9u32.to_be_bytes()), "version 9");
        refused(&patched(20, &40u32.to_be_bytes()), "cluster_bits");
        refused(&patched(32, &1u32.to_be_bytes()), "encryption");
        refused(&patched(72, &1u64.to_be_bytes()), "dirty");
        refused(&patched(72, &2u64.to_be_bytes()), "corrupt");
        refused(&patched(72, &(1u64 << 40).to_be_bytes()), "incompatible");
        refused(&patched(24, &u64::MAX.to_be_bytes()), "too large");
        refused(&patched(40, &(1u64 << 50).to_be_bytes()), "L1 table");
        refused(&patched(36, &0u32.to_be_bytes()), "L1 table");
        refused(&patched(48, &12345u64.to_be_bytes()), "refcount table");
        // No refcount block for the header cluster: imago's first allocation used to recurse
        // until the stack overflowed (found by fuzz/fuzz_targets/qcow2_image.rs).
        let rt = be64(&good, 48) as usize;
        refused(&patched(rt, &[0; 8]), "refcount table entry 0");
        refused(
            &patched(rt, &(1u64 << 40).to_be_bytes()),
            "refcount table entry 0",
        );
        // A bad header extension: imago's own checks.
        let ext = be32(&good, 100) as usize;
        refused(&patched(ext, &[0xff; 8]), "corrupt header");

        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=data.raw",
                "ext.qcow2",
                "1M",
            ],
        );
        let e = Qcow2File::open(&dir.path().join("ext.qcow2"), false).unwrap_err();
        assert!(e.to_string().contains("external data file"), "{e}");

        std::fs::remove_file(&base_path).unwrap();
        let e = Qcow2File::open(&overlay, false).unwrap_err().to_string();
        assert!(
            e.contains("backing file") && e.contains(&base_path.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn first_refcount_block_must_exist() {
        assert_eq!(check_first_refblock(0x20000, 16, 0x30000), Ok(()));
        // The low bits are flags (reserved), not part of the offset.
        assert_eq!(check_first_refblock(0x20001, 16, 0x30000), Ok(()));
        assert!(check_first_refblock(0, 16, 0x30000).is_err());
        assert!(check_first_refblock(0x1ff, 9, 0x30000).is_err());
        assert!(
            check_first_refblock(0x20200, 16, 0x30000).is_err(),
            "misaligned"
        );
        assert!(
            check_first_refblock(0x30000, 16, 0x30000).is_err(),
            "past the end"
        );
        assert!(
            check_first_refblock(u64::MAX, 9, u64::MAX).is_err(),
            "wraps"
        );
    }

    #[test]
    fn header_check_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if b.len() >= 8 && next() % 2 == 0 {
                b[..4].copy_from_slice(&MAGIC);
                b[4..8].copy_from_slice(&(2 + (next() % 2) as u32).to_be_bytes());
            }
            let _ = check_header(&b, next() % 300_000);
        }
    }
}
