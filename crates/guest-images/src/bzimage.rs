//! Extracting the uncompressed `vmlinux` ELF from an x86 bzImage.
//!
//! Layout (Documentation/arch/x86/boot.rst): the real-mode setup occupies
//! `(setup_sects + 1) * 512` bytes, followed by the protected-mode code. The setup header
//! carries `"HdrS"` at 0x202, and since boot protocol 2.08 `payload_offset` (0x248) and
//! `payload_length` (0x24c), relative to the start of the protected-mode code. The payload
//! is the compressed `vmlinux`; the kernel build appends its uncompressed size as a
//! little-endian u32 to the compressed stream, which this module checks.

use std::io::Read;

use crate::elf::{self, EM_X86_64, u16_at, u32_at};

/// Upper bound for a decompressed kernel, to refuse decompression bombs.
const MAX_VMLINUX: u64 = 1 << 30;
/// Legacy LZ4 frame magic (`lz4 -l`, used by the kernel's `KERNEL_LZ4`).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Payload compression, detected by magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `CONFIG_KERNEL_UNCOMPRESSED`: the payload is the ELF itself.
    None,
    Gzip,
    Bzip2,
    Lzma,
    Xz,
    Lzo,
    Lz4,
    Zstd,
}

impl Compression {
    /// Detects the compression from the first bytes of the payload.
    pub fn detect(p: &[u8]) -> Option<Self> {
        Some(
            if p.starts_with(b"\x1f\x8b") || p.starts_with(b"\x1f\x9e") {
                Self::Gzip
            } else if p.starts_with(b"BZh") {
                Self::Bzip2
            } else if p.starts_with(b"\x5d\x00\x00") {
                Self::Lzma
            } else if p.starts_with(b"\xfd7zXZ\x00") {
                Self::Xz
            } else if p.starts_with(b"\x89LZO") {
                Self::Lzo
            } else if p.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
                Self::Lz4
            } else if p.starts_with(b"\x28\xb5\x2f\xfd") {
                Self::Zstd
            } else if p.starts_with(b"\x7fELF") {
                Self::None
            } else {
                return None;
            },
        )
    }

    /// Lower-case name, as in `CONFIG_KERNEL_<NAME>`.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "uncompressed",
            Self::Gzip => "gzip",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Xz => "xz",
            Self::Lzo => "lzo",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from parsing a bzImage or extracting its `vmlinux`.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    #[error("not a bzImage: {0} (expected an x86 Linux kernel such as /boot/vmlinuz-*)")]
    NotBzImage(String),
    #[error(
        "unsupported kernel compression {0}: rebuild the kernel with gzip, xz, lzma, zstd, \
         lz4 or bzip2 (CONFIG_KERNEL_*)"
    )]
    UnsupportedCompression(String),
    #[error("truncated bzImage payload: {0} (the file is incomplete; download it again)")]
    Truncated(String),
    #[error("corrupt {compression} payload: {detail}")]
    Corrupt {
        compression: Compression,
        detail: String,
    },
    #[error(
        "decompressed kernel is {actual} bytes but the bzImage says {expected}: corrupt payload"
    )]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("decompressed payload is not an x86_64 ELF64 vmlinux: {0}")]
    NotVmlinux(String),
}

/// The fields of the setup header this module uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BzImageHeader {
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    /// Number of 512-byte setup sectors (0 already mapped to 4).
    pub setup_sects: u8,
    /// Absolute file offset of the compressed payload.
    pub payload_offset: usize,
    /// Length of the compressed payload (including the appended size word).
    pub payload_length: usize,
    /// Detected payload compression, `None` if the magic is unknown.
    pub compression: Option<Compression>,
}

/// A decompressed kernel.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    /// The ELF image.
    pub elf: Vec<u8>,
    /// How it was compressed inside the bzImage.
    pub compression: Compression,
    /// `e_entry` of the ELF.
    pub entry: u64,
    /// Xen PVH 32-bit entry point (ELF note "Xen", type 18), if the kernel has one.
    pub pvh_entry: Option<u64>,
}

/// Parses and validates the setup header of `image`.
pub fn parse_header(image: &[u8]) -> Result<BzImageHeader, BzImageError> {
    let not = |m: &str| BzImageError::NotBzImage(m.to_owned());
    if image.len() < 0x250 {
        return Err(not("file is too short to hold a setup header"));
    }
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        return Err(not("no \"HdrS\" magic at offset 0x202"));
    }
    let protocol = u16_at(image, 0x206).ok_or_else(|| not("short header"))?;
    if protocol < 0x0208 {
        return Err(not(&format!(
            "boot protocol {}.{:02} predates payload_offset (needs 2.08+)",
            protocol >> 8,
            protocol & 0xff
        )));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n,
    };
    let pm_start = (usize::from(setup_sects) + 1) * 512;
    let rel_off = u32_at(image, 0x248).ok_or_else(|| not("short header"))? as usize;
    let payload_length = u32_at(image, 0x24c).ok_or_else(|| not("short header"))? as usize;
    let payload_offset = pm_start + rel_off;
    if payload_length == 0 {
        return Err(not("payload_length is 0"));
    }
    let end = payload_offset.saturating_add(payload_length);
    if end > image.len() {
        return Err(BzImageError::Truncated(format!(
            "payload spans bytes {payload_offset}..{end} but the file has {} bytes",
            image.len()
        )));
    }
    let compression = Compression::detect(&image[payload_offset..end]);
    Ok(BzImageHeader {
        protocol,
        setup_sects,
        payload_offset,
        payload_length,
        compression,
    })
}

/// Decompresses the kernel inside `image` and checks it is an x86_64 ELF64.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vmlinux, BzImageError> {
    let hdr = parse_header(image)?;
    let payload = &image[hdr.payload_offset..hdr.payload_offset + hdr.payload_length];
    let compression = hdr.compression.ok_or_else(|| {
        let magic: Vec<String> = payload.iter().take(6).map(|b| format!("{b:02x}")).collect();
        BzImageError::UnsupportedCompression(format!("(unknown magic {})", magic.join(" ")))
    })?;
    let elf_bytes = decompress(compression, payload)?;
    // The build appends the uncompressed size (mod 2^32) to every compressed stream.
    if compression != Compression::None && payload.len() >= 4 {
        let expected = u64::from(u32_at(payload, payload.len() - 4).unwrap_or(0));
        let actual = elf_bytes.len() as u64;
        if expected != actual & 0xffff_ffff {
            return Err(BzImageError::SizeMismatch { expected, actual });
        }
    }
    let info = elf::parse(&elf_bytes).map_err(|e| BzImageError::NotVmlinux(e.to_owned()))?;
    if info.machine != EM_X86_64 {
        return Err(BzImageError::NotVmlinux(format!(
            "e_machine is {} (x86_64 is {EM_X86_64})",
            info.machine
        )));
    }
    Ok(Vmlinux {
        elf: elf_bytes,
        compression,
        entry: info.entry,
        pvh_entry: info.pvh_entry,
    })
}

/// Decompresses a kernel payload (a trailing size word is ignored by every decoder).
pub fn decompress(compression: Compression, payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |e: &dyn std::fmt::Display| BzImageError::Corrupt {
        compression,
        detail: e.to_string(),
    };
    let io_err = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            BzImageError::Truncated(format!("{compression} stream ends early: {e}"))
        } else {
            corrupt(&e)
        }
    };
    let read_all = |r: &mut dyn Read| -> Result<Vec<u8>, BzImageError> {
        let mut out = Vec::new();
        r.take(MAX_VMLINUX + 1)
            .read_to_end(&mut out)
            .map_err(io_err)?;
        if out.len() as u64 > MAX_VMLINUX {
            return Err(corrupt(&"decompresses to more than 1 GiB"));
        }
        Ok(out)
    };
    match compression {
        Compression::None => Ok(payload.to_vec()),
        Compression::Gzip => read_all(&mut flate2::read::GzDecoder::new(payload)),
        Compression::Bzip2 => read_all(&mut bzip2::read::BzDecoder::new(payload)),
        Compression::Xz => read_all(&mut lzma_rust2::XzReader::new(payload, false)),
        Compression::Lzma => {
            let mut r =
                lzma_rust2::LzmaReader::new_mem_limit(payload, u32::MAX, None).map_err(io_err)?;
            read_all(&mut r)
        }
        Compression::Zstd => {
            let mut r = ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| {
                let s = e.to_string();
                if s.contains("EOF") || s.contains("eof") {
                    BzImageError::Truncated(format!("zstd stream ends early: {s}"))
                } else {
                    corrupt(&e)
                }
            })?;
            read_all(&mut r)
        }
        Compression::Lz4 => lz4_legacy(payload),
        Compression::Lzo => Err(BzImageError::UnsupportedCompression(
            "lzo (no maintained pure-Rust decoder)".to_owned(),
        )),
    }
}

/// Decodes the legacy LZ4 frame format (`lz4 -l`): a magic word, then blocks each
/// prefixed by their compressed length and decompressing to at most 8 MiB. The stream
/// ends at the end of input, or at the 4-byte size word the kernel build appends.
fn lz4_legacy(payload: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |detail: String| BzImageError::Corrupt {
        compression: Compression::Lz4,
        detail,
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut blocks = 0usize;
    while payload.len() - pos >= 4 {
        let word = u32_at(payload, pos).unwrap_or(0);
        if word == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let chunk = word as usize;
        let start = pos + 4;
        let remaining = payload.len() - start;
        if chunk > remaining {
            if remaining == 0 && blocks > 0 {
                break; // the appended uncompressed-size word
            }
            return Err(BzImageError::Truncated(format!(
                "lz4 block {blocks} needs {chunk} bytes, only {remaining} left"
            )));
        }
        let block = &payload[start..start + chunk];
        let before = out.len();
        out.resize(before + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(block, &mut out[before..])
            .map_err(|e| corrupt(format!("block {blocks}: {e}")))?;
        out.truncate(before + n);
        if out.len() as u64 > MAX_VMLINUX {
            return Err(corrupt("decompresses to more than 1 GiB".to_owned()));
        }
        pos = start + chunk;
        blocks += 1;
    }
    if blocks == 0 {
        return Err(BzImageError::Truncated(
            "lz4 stream has no blocks".to_owned(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::{note, tiny_elf};
    use std::io::Write;

    fn pvh_elf() -> Vec<u8> {
        let mut notes = note(b"Xen", 18, &0x0100_0123u32.to_le_bytes());
        notes.extend(vec![0x90; 3000]); // some bulk, so compressors have work to do
        tiny_elf(&notes)
    }

    fn with_size_word(mut compressed: Vec<u8>, raw_len: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(raw_len as u32).to_le_bytes());
        compressed
    }

    /// Wraps `payload` in a minimal bzImage with `setup_sects` setup sectors.
    fn fake_bzimage(payload: &[u8], setup_sects: u8) -> Vec<u8> {
        let setup_len = (usize::from(setup_sects.max(1)) + 1) * 512;
        let mut img = vec![0u8; setup_len];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let pm_code = b"protected-mode decompressor stub";
        let rel = pm_code.len() as u32;
        img[0x248..0x24c].copy_from_slice(&rel.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(pm_code);
        img.extend_from_slice(payload);
        img.extend_from_slice(b"trailing code and data");
        img
    }

    fn gzip(raw: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(raw).unwrap();
        with_size_word(e.finish().unwrap(), raw.len())
    }

    fn check_roundtrip(payload: Vec<u8>, expect: Compression) {
        let raw = pvh_elf();
        let img = fake_bzimage(&payload, 3);
        let hdr = parse_header(&img).unwrap();
        assert_eq!(hdr.compression, Some(expect));
        assert_eq!(hdr.payload_offset, 4 * 512 + 32);
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, expect);
        assert_eq!(v.elf, raw);
        assert_eq!(v.pvh_entry, Some(0x0100_0123));
        assert_eq!(v.entry, 0x0100_0000);
    }

    #[test]
    fn gzip_payload() {
        check_roundtrip(gzip(&pvh_elf()), Compression::Gzip);
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let payload = gzip(&pvh_elf());
        let mut img = fake_bzimage(&payload, 4);
        img[0x1f1] = 0;
        assert_eq!(parse_header(&img).unwrap().setup_sects, 4);
        assert!(extract_vmlinux(&img).is_ok());
    }

    #[test]
    fn xz_payload_with_x86_bcj_filter() {
        // The kernel compresses with `xz --check=crc32 --x86 --lzma2=...`.
        let raw = pvh_elf();
        let mut opts = lzma_rust2::XzOptions::with_preset(6);
        opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
        opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(&raw).unwrap();
        check_roundtrip(
            with_size_word(w.finish().unwrap(), raw.len()),
            Compression::Xz,
        );
    }

    #[test]
    fn xz_payload_from_xz_tool() {
        // Cross-check against the real xz(1) with the kernel's flags, when installed.
        let raw = pvh_elf();
        let Ok(mut child) = std::process::Command::new("xz")
            .args([
                "--format=xz",
                "--check=crc32",
                "--x86",
                "--lzma2=preset=9",
                "-c",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("skipping: xz(1) not installed");
            return;
        };
        child.stdin.take().unwrap().write_all(&raw).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        check_roundtrip(with_size_word(out.stdout, raw.len()), Compression::Xz);
    }

    #[test]
    fn lz4_legacy_payload() {
        let raw = pvh_elf();
        let mut payload = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        // Two blocks, to exercise the block loop.
        for part in [&raw[..1000], &raw[1000..]] {
            let block = lz4_flex::block::compress(part);
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        check_roundtrip(with_size_word(payload, raw.len()), Compression::Lz4);
    }

    #[test]
    fn bzip2_payload() {
        let raw = pvh_elf();
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        e.write_all(&raw).unwrap();
        check_roundtrip(
            with_size_word(e.finish().unwrap(), raw.len()),
            Compression::Bzip2,
        );
    }

    #[test]
    fn zstd_payload() {
        let raw = pvh_elf();
        let compressed = ruzstd::encoding::compress_to_vec(
            &raw[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        check_roundtrip(with_size_word(compressed, raw.len()), Compression::Zstd);
    }

    #[test]
    fn uncompressed_payload() {
        let raw = pvh_elf();
        let img = fake_bzimage(&raw, 2);
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, Compression::None);
        assert_eq!(v.elf, raw);
    }

    #[test]
    fn not_a_bzimage() {
        assert!(matches!(
            extract_vmlinux(b""),
            Err(BzImageError::NotBzImage(_))
        ));
        assert!(matches!(
            extract_vmlinux(&pvh_elf()),
            Err(BzImageError::NotBzImage(_))
        ));
        let mut img = fake_bzimage(&gzip(&pvh_elf()), 2);
        img[0x202] = b'X';
        let err = extract_vmlinux(&img).unwrap_err();
        assert!(matches!(err, BzImageError::NotBzImage(_)), "{err}");
        assert!(err.to_string().contains("HdrS"));
        let mut old = fake_bzimage(&gzip(&pvh_elf()), 2);
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&old),
            Err(BzImageError::NotBzImage(_))
        ));
    }

    #[test]
    fn unsupported_compression() {
        let img = fake_bzimage(b"\x89LZO\x00\x0d\x0a\x1a\x0a rest", 2);
        let err = extract_vmlinux(&img).unwrap_err();
        assert!(
            matches!(err, BzImageError::UnsupportedCompression(_)),
            "{err}"
        );
        assert!(err.to_string().contains("lzo"));
        let img = fake_bzimage(b"\x00\x01\x02\x03 unknown", 2);
        let err = extract_vmlinux(&img).unwrap_err();
        assert!(
            err.to_string().contains("unknown magic 00 01 02 03"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file() {
        let img = fake_bzimage(&gzip(&pvh_elf()), 2);
        let cut = &img[..img.len() - 100];
        let err = extract_vmlinux(cut).unwrap_err();
        assert!(matches!(err, BzImageError::Truncated(_)), "{err}");
    }

    #[test]
    fn truncated_streams() {
        let raw = pvh_elf();
        let gz = gzip(&raw);
        let err = decompress(Compression::Gzip, &gz[..gz.len() / 2]).unwrap_err();
        assert!(matches!(err, BzImageError::Truncated(_)), "{err}");

        let mut lz = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let block = lz4_flex::block::compress(&raw);
        lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz.extend_from_slice(&block[..block.len() / 2]);
        let err = decompress(Compression::Lz4, &lz).unwrap_err();
        assert!(matches!(err, BzImageError::Truncated(_)), "{err}");
    }

    #[test]
    fn corrupt_payloads_fail_cleanly() {
        let raw = pvh_elf();
        // Wrong size word.
        let mut gz = gzip(&raw);
        let n = gz.len();
        gz[n - 4..].copy_from_slice(&7u32.to_le_bytes());
        let err = extract_vmlinux(&fake_bzimage(&gz, 2)).unwrap_err();
        assert!(matches!(err, BzImageError::SizeMismatch { .. }), "{err}");
        // Not an ELF inside.
        let err = extract_vmlinux(&fake_bzimage(&gzip(&[0x42; 100]), 2)).unwrap_err();
        assert!(matches!(err, BzImageError::NotVmlinux(_)), "{err}");
        // Wrong machine.
        let mut arm = raw.clone();
        arm[18..20].copy_from_slice(&183u16.to_le_bytes());
        let err = extract_vmlinux(&fake_bzimage(&gzip(&arm), 2)).unwrap_err();
        assert!(err.to_string().contains("e_machine is 183"), "{err}");
        // Garbage after each magic must not panic.
        for magic in [
            &b"\x1f\x8b"[..],
            b"BZh9",
            b"\x5d\x00\x00",
            b"\xfd7zXZ\x00",
            b"\x02\x21\x4c\x18",
            b"\x28\xb5\x2f\xfd",
        ] {
            let mut p = magic.to_vec();
            p.extend_from_slice(&[0xff; 64]);
            assert!(extract_vmlinux(&fake_bzimage(&p, 2)).is_err());
        }
    }
}
