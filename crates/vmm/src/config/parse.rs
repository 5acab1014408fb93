//! Cloud Hypervisor's option grammar: `key=value` pairs separated by commas, with shorthands.

use std::path::PathBuf;

use super::{CpusConfig, MemoryConfig, SerialConfig, parse_size};
use crate::arch::cpu_template::CpuTemplate;

/// Splits `a=1,b=2` into pairs. Items without `=` that start with `-` continue the previous value
/// (so `features=-cx16,-xsave` keeps both features); any other bare item is an error.
fn pairs<'a>(option: &str, text: &'a str) -> Result<Vec<(&'a str, String)>, String> {
    let mut out: Vec<(&str, String)> = Vec::new();
    for item in text.split(',').filter(|s| !s.is_empty()) {
        match (item.split_once('='), out.last_mut()) {
            (Some((k, v)), _) => out.push((k.trim(), v.to_string())),
            (None, Some((_, last))) if item.starts_with('-') => {
                last.push(',');
                last.push_str(item);
            }
            (None, _) => return Err(format!("'{item}' is not key=value (in {option})")),
        }
    }
    Ok(out)
}

fn unknown(option: &str, key: &str, known: &str) -> String {
    format!("unknown {option} key '{key}' (known: {known})")
}

/// `--cpus 2` or `--cpus boot=2[,features=-cx16,-xsave]`.
pub fn parse_cpus(text: &str) -> Result<CpusConfig, String> {
    let mut cfg = CpusConfig::default();
    let number = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("'{v}' is not a number of vCPUs"))
    };
    if !text.contains('=') {
        cfg.boot = number(text)?;
        return Ok(cfg);
    }
    for (k, v) in pairs("cpus", text)? {
        match k {
            "boot" => cfg.boot = number(&v)?,
            "features" => cfg.template = CpuTemplate::parse(&v).map_err(|e| e.to_string())?,
            _ => return Err(unknown("cpus", k, "boot, features")),
        }
    }
    Ok(cfg)
}

/// `--memory 512M` or `--memory size=512M`.
pub fn parse_memory(text: &str) -> Result<MemoryConfig, String> {
    if !text.contains('=') {
        return parse_size(text).map(|size| MemoryConfig { size });
    }
    let mut cfg = MemoryConfig::default();
    for (k, v) in pairs("memory", text)? {
        match k {
            "size" => cfg.size = parse_size(&v)?,
            _ => return Err(unknown("memory", k, "size")),
        }
    }
    Ok(cfg)
}

/// `--serial tty|off|file=PATH`.
pub fn parse_serial(text: &str) -> Result<SerialConfig, String> {
    match text {
        "tty" => Ok(SerialConfig::Tty),
        "off" => Ok(SerialConfig::Off),
        _ => match text.split_once('=') {
            Some(("file", p)) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            Some(("file", _)) => Err("file= needs a path".into()),
            _ => Err(format!("'{text}' is not one of tty, off, file=PATH")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_forms() {
        assert_eq!(parse_cpus("4").unwrap().boot, 4);
        let c = parse_cpus("boot=2,features=-cx16,-xsave").unwrap();
        assert_eq!(c.boot, 2);
        assert!(c.template.hides("cx16") && c.template.hides("xsave"));
        assert!(parse_cpus("boot=two").unwrap_err().contains("not a number"));
        assert!(
            parse_cpus("boot=1,max=4")
                .unwrap_err()
                .contains("unknown cpus key 'max'")
        );
        assert!(
            parse_cpus("boot=1,features=-nope")
                .unwrap_err()
                .contains("unknown CPU feature")
        );
        assert!(parse_cpus("boot=1,smt").is_err());
    }

    #[test]
    fn memory_forms() {
        assert_eq!(parse_memory("512M").unwrap().size, 512 << 20);
        assert_eq!(parse_memory("size=4G").unwrap().size, 4 << 30);
        assert!(
            parse_memory("size=4G,shared=on")
                .unwrap_err()
                .contains("unknown memory key 'shared'")
        );
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn serial_forms() {
        assert_eq!(parse_serial("tty").unwrap(), SerialConfig::Tty);
        assert_eq!(parse_serial("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
    }
}
