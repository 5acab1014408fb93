//! A streaming writer for "newc" (`070701`) cpio archives, the format the Linux kernel
//! unpacks as an initramfs.
//!
//! Every entry is a 110-byte ASCII header (magic + 13 eight-digit hex fields), the
//! NUL-terminated path padded to a 4-byte boundary, then the data padded to a 4-byte
//! boundary. The archive ends with an entry named `TRAILER!!!`. Timestamps and owners are
//! fixed (mtime 0, uid/gid 0) so the output is reproducible; inodes are numbered from 1
//! in the order entries are written (no hard links are produced).

use std::io::{self, Read, Write};

/// File-type bits of `st_mode`.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const PERM_MASK: u32 = 0o7777;

/// Length of a newc header, magic included.
pub const HEADER_LEN: usize = 110;
/// Name of the terminating entry.
pub const TRAILER: &str = "TRAILER!!!";

/// Errors from [`CpioWriter`].
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The path cannot be stored (empty, contains NUL, `.`/`..` components, ...).
    #[error("invalid cpio path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// newc stores sizes in 32 bits.
    #[error("cpio entry {path:?} is {size} bytes; newc archives hold at most 4 GiB - 1 per file")]
    TooLarge { path: String, size: u64 },
    /// A reader passed to [`CpioWriter::file_from_reader`] gave fewer bytes than announced.
    #[error("cpio entry {path:?}: expected {expected} bytes from the reader, got {actual}")]
    ShortRead {
        path: String,
        expected: u64,
        actual: u64,
    },
    /// Writing to the underlying stream failed.
    #[error("writing cpio archive: {0}")]
    Io(#[from] io::Error),
}

/// One header's worth of fields (see `newc` in `cpio(5)`).
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

/// Streaming newc cpio writer. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        let ino = self.alloc_ino();
        self.entry(
            path,
            Header {
                ino,
                mode: S_IFDIR | (perm & PERM_MASK),
                nlink: 2,
                filesize: 0,
                rdevmajor: 0,
                rdevminor: 0,
            },
            &[],
        )
    }

    /// Adds a regular file with permission bits `perm` and contents `data`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let filesize = size32(path, data.len() as u64)?;
        let ino = self.alloc_ino();
        self.entry(
            path,
            Header {
                ino,
                mode: S_IFREG | (perm & PERM_MASK),
                nlink: 1,
                filesize,
                rdevmajor: 0,
                rdevminor: 0,
            },
            data,
        )
    }

    /// Adds a regular file of exactly `size` bytes read from `data` (streamed, not buffered).
    pub fn file_from_reader(
        &mut self,
        path: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let filesize = size32(path, size)?;
        let ino = self.alloc_ino();
        self.header(
            path,
            &Header {
                ino,
                mode: S_IFREG | (perm & PERM_MASK),
                nlink: 1,
                filesize,
                rdevmajor: 0,
                rdevminor: 0,
            },
        )?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        self.offset += copied;
        if copied != size {
            return Err(CpioError::ShortRead {
                path: path.to_owned(),
                expected: size,
                actual: copied,
            });
        }
        self.pad()
    }

    /// Adds a symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::InvalidPath {
                path: target.to_owned(),
                reason: "symlink target must be non-empty and free of NUL bytes",
            });
        }
        let filesize = size32(path, target.len() as u64)?;
        let ino = self.alloc_ino();
        self.entry(
            path,
            Header {
                ino,
                mode: S_IFLNK | 0o777,
                nlink: 1,
                filesize,
                rdevmajor: 0,
                rdevminor: 0,
            },
            target.as_bytes(),
        )
    }

    /// Adds a character device node, e.g. `/dev/console` = 5:1, `/dev/null` = 1:3.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let ino = self.alloc_ino();
        self.entry(
            path,
            Header {
                ino,
                mode: S_IFCHR | (perm & PERM_MASK),
                nlink: 1,
                filesize: 0,
                rdevmajor: major,
                rdevminor: minor,
            },
            &[],
        )
    }

    /// Writes the `TRAILER!!!` entry, flushes and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.write_raw(
            TRAILER,
            &Header {
                ino: 0,
                mode: 0,
                nlink: 1,
                filesize: 0,
                rdevmajor: 0,
                rdevminor: 0,
            },
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn alloc_ino(&mut self) -> u32 {
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1).max(1);
        ino
    }

    fn entry(&mut self, path: &str, h: Header, data: &[u8]) -> Result<(), CpioError> {
        self.header(path, &h)?;
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        self.pad()
    }

    fn header(&mut self, path: &str, h: &Header) -> Result<(), CpioError> {
        let name = normalize_path(path)?;
        self.write_raw(&name, h)
    }

    fn write_raw(&mut self, name: &str, h: &Header) -> Result<(), CpioError> {
        let namesize = size32(name, name.len() as u64 + 1)?;
        let fields = [
            h.ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.filesize,
            0, // devmajor
            0, // devminor
            h.rdevmajor,
            h.rdevminor,
            namesize,
            0, // check
        ];
        let mut buf = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        buf.extend_from_slice(b"070701");
        for f in fields {
            buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        self.out.write_all(&buf)?;
        self.offset += buf.len() as u64;
        self.pad()
    }

    /// Pads the stream to the next 4-byte boundary.
    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        self.offset += n as u64;
        Ok(())
    }
}

fn size32(path: &str, size: u64) -> Result<u32, CpioError> {
    u32::try_from(size).map_err(|_| CpioError::TooLarge {
        path: path.to_owned(),
        size,
    })
}

/// Archive paths are stored relative (`bin/busybox`), the way the kernel expects them.
fn normalize_path(path: &str) -> Result<String, CpioError> {
    let invalid = |reason| CpioError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    if path.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(invalid("empty path (the root directory is implicit)"));
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(invalid("`.` and `..` components are not allowed"));
    }
    let joined = parts.join("/");
    if joined == TRAILER {
        return Err(invalid("reserved name"));
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Stdio};

    #[test]
    fn exact_header_bytes_for_a_file() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/init", 0o755, b"hi\n").unwrap();
        let out = w.finish().unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(
            b"070701\
              00000001\
              000081ED\
              00000000\
              00000000\
              00000001\
              00000000\
              00000003\
              00000000\
              00000000\
              00000000\
              00000000\
              00000005\
              00000000",
        );
        assert_eq!(expected.len(), HEADER_LEN);
        expected.extend_from_slice(b"init\0"); // 110 + 5 = 115 -> pad to 116
        expected.push(0);
        expected.extend_from_slice(b"hi\n\0"); // 3 bytes of data -> pad to 4
        let trailer_start = expected.len();
        expected.extend_from_slice(
            b"070701\
              00000000\
              00000000\
              00000000\
              00000000\
              00000001\
              00000000\
              00000000\
              00000000\
              00000000\
              00000000\
              00000000\
              0000000B\
              00000000",
        );
        expected.extend_from_slice(b"TRAILER!!!\0"); // 110 + 11 = 121 -> pad to 124
        expected.extend_from_slice(&[0, 0, 0]);
        assert_eq!(&out[..trailer_start], &expected[..trailer_start]);
        assert_eq!(out, expected);
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn char_dev_and_symlink_fields() {
        let mut w = CpioWriter::new(Vec::new());
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let out = w.finish().unwrap();
        let field = |entry: &[u8], i: usize| {
            let s = std::str::from_utf8(&entry[6 + i * 8..6 + (i + 1) * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        assert_eq!(field(&out, 1), 0o020_600); // mode
        assert_eq!(field(&out, 9), 5); // rdevmajor
        assert_eq!(field(&out, 10), 1); // rdevminor
        // "dev/console\0" = 12 bytes: 110 + 12 = 122 -> next entry at 124
        let second = &out[124..];
        assert_eq!(&second[..6], b"070701");
        assert_eq!(field(second, 0), 2); // ino
        assert_eq!(field(second, 1), 0o120_777);
        assert_eq!(field(second, 6), 7); // "busybox"
    }

    #[test]
    fn rejects_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(matches!(
            w.dir("/", 0o755),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(matches!(
            w.file("a/../b", 0o644, b""),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(matches!(
            w.file("a\0b", 0o644, b""),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(matches!(
            w.symlink("a", ""),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(matches!(
            w.file_from_reader("short", 0o644, 10, &mut &b"abc"[..]),
            Err(CpioError::ShortRead { .. })
        ));
    }

    /// True if `tool` can be run; when it cannot, tests skip, except under CI=true.
    fn have_tool(tool: &str) -> bool {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "`{tool}` is required under CI=true: apt-get install {tool}"
            );
            eprintln!("skipping: `{tool}` is not installed (apt-get install {tool})");
        }
        ok
    }

    fn sample_archive() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.dir("dev", 0o755).unwrap();
        w.file("bin/busybox", 0o755, &[0xAB; 1001]).unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/null", 0o666, 1, 3).unwrap();
        w.file_from_reader("init", 0o755, 10, &mut &b"#!/bin/sh\n"[..])
            .unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    fn run_cpio(args: &[&str], dir: &Path, input: &[u8]) -> (String, String) {
        use std::io::Write as _;
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "cpio {args:?} failed: {stderr}");
        (stdout, stderr)
    }

    #[test]
    fn cpio_lists_the_archive() {
        if !have_tool("cpio") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (listing, _) = run_cpio(&["-it"], dir.path(), &sample_archive());
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "bin/busybox",
                "bin/sh",
                "dev/null",
                "init",
                "empty"
            ]
        );
    }

    #[test]
    fn cpio_extracts_the_archive() {
        if !have_tool("cpio") {
            return;
        }
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let (_, stderr) = run_cpio(
            &["-idv", "--no-absolute-filenames"],
            dir.path(),
            &sample_archive(),
        );
        assert!(stderr.contains("bin/busybox"), "{stderr}");
        let root = dir.path();
        assert_eq!(
            std::fs::read(root.join("bin/busybox")).unwrap(),
            vec![0xAB; 1001]
        );
        assert_eq!(std::fs::read(root.join("init")).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(root.join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert!(std::fs::read(root.join("empty")).unwrap().is_empty());
        // mknod needs CAP_MKNOD: only check the node when we could create it.
        if let Ok(meta) = std::fs::symlink_metadata(root.join("dev/null")) {
            assert!(meta.file_type().is_char_device());
            assert_eq!(meta.rdev(), libc_makedev(1, 3));
        }
    }

    /// glibc's `makedev` encoding, for small major/minor numbers.
    fn libc_makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | (minor & 0xff)
    }
}
