//! Cloud Hypervisor's option grammar: `key=value` pairs separated by commas, with shorthands.

use std::path::PathBuf;

use super::{
    ConsoleConfig, CpusConfig, DISK_QUEUE_SIZE, DiskConfig, DiskFormat, MAX_DISK_QUEUES,
    MAX_NET_QUEUES, MemoryConfig, NET_QUEUE_SIZE, NetConfig, SerialConfig, VhostUserConfig,
    VsockConfig, parse_size,
};
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
            "features" => cfg.template = Some(CpuTemplate::parse(&v).map_err(|e| e.to_string())?),
            _ => return Err(unknown("cpus", k, "boot, features")),
        }
    }
    Ok(cfg)
}

/// `--memory 512M` or `--memory size=512M[,shared=on]`.
pub fn parse_memory(text: &str) -> Result<MemoryConfig, String> {
    if !text.contains('=') {
        return parse_size(text).map(|size| MemoryConfig {
            size,
            shared: false,
        });
    }
    let mut cfg = MemoryConfig::default();
    for (k, v) in pairs("memory", text)? {
        match k {
            "size" => cfg.size = parse_size(&v)?,
            "shared" => cfg.shared = on_off("memory", k, &v)?,
            _ => return Err(unknown("memory", k, "size, shared")),
        }
    }
    Ok(cfg)
}

/// `on`/`true` or `off`/`false`.
fn on_off(option: &str, key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(format!("{option}: {key}='{v}' is not on or off")),
    }
}

/// The vhost-user keys of `--disk` / `--net`, collected while the rest is parsed and checked
/// at the end: `socket=` and `queue_size=` mean nothing without `vhost_user=true`.
#[derive(Default)]
struct VhostUserKeys {
    enabled: bool,
    socket: Option<PathBuf>,
    queue_size: Option<u16>,
}

impl VhostUserKeys {
    /// Takes `k=v` if it is a vhost-user key.
    fn take(&mut self, option: &str, k: &str, v: &str) -> Result<bool, String> {
        match k {
            "vhost_user" => self.enabled = on_off(option, k, v)?,
            "socket" if !v.is_empty() => self.socket = Some(PathBuf::from(v)),
            "socket" => return Err(format!("{option}: socket= needs a path")),
            "queue_size" => self.queue_size = Some(queue_size(option, v)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The device's vhost-user configuration; `conflicts` are the keys given that a backend
    /// decides (or that name a host resource the backend owns).
    fn finish(
        self,
        option: &str,
        default_queue_size: u16,
        conflicts: &[&str],
    ) -> Result<Option<VhostUserConfig>, String> {
        if !self.enabled {
            return match (self.socket, self.queue_size) {
                (None, None) => Ok(None),
                _ => Err(format!(
                    "{option}: socket= and queue_size= need vhost_user=true"
                )),
            };
        }
        if let Some(k) = conflicts.first() {
            return Err(format!(
                "{option}: {k}= does not go with vhost_user=true (the backend decides it)"
            ));
        }
        let socket = self
            .socket
            .ok_or_else(|| format!("{option}: vhost_user=true needs socket=PATH"))?;
        Ok(Some(VhostUserConfig {
            socket,
            queue_size: self.queue_size.unwrap_or(default_queue_size),
        }))
    }
}

/// A vhost-user queue size: a power of two the transport can carry.
pub(super) fn queue_size(option: &str, v: &str) -> Result<u16, String> {
    let max = hyperpool_devices::virtio::MAX_QUEUE_SIZE;
    v.parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= max)
        .ok_or_else(|| format!("{option}: queue_size='{v}' is not a power of two up to {max}"))
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

/// `--console off|tty|file=PATH` (the grammar of `--serial`).
pub fn parse_console(text: &str) -> Result<ConsoleConfig, String> {
    Ok(match parse_serial(text)? {
        SerialConfig::Off => ConsoleConfig::Off,
        SerialConfig::Tty => ConsoleConfig::Tty,
        SerialConfig::File(p) => ConsoleConfig::File(p),
        SerialConfig::Socket { .. } => return Err("a socket is not a console mode".into()),
    })
}

/// `--disk path=FILE[,readonly=on|off][,num_queues=N][,id=ID][,format=raw|qcow2]`, or
/// `--disk vhost_user=true,socket=PATH[,num_queues=N][,queue_size=N][,id=ID]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut cfg = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        num_queues: 1,
        id: None,
        format: None,
        vhost_user: None,
    };
    let mut vhost = VhostUserKeys::default();
    let mut image_keys = Vec::new();
    for (k, v) in pairs("disk", text)? {
        if vhost.take("disk", k, &v)? {
            continue;
        }
        if matches!(k, "path" | "readonly" | "format") {
            image_keys.push(k);
        }
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "path" => return Err("disk: path= needs a file".into()),
            "readonly" => {
                cfg.readonly = match v.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => return Err(format!("disk: readonly='{v}' is not on or off")),
                }
            }
            "num_queues" => {
                cfg.num_queues = v
                    .parse::<u16>()
                    .map_err(|_| format!("disk: num_queues='{v}' is not a number"))
                    .and_then(disk_queues)?
            }
            "id" => cfg.id = Some(disk_serial(v)?),
            "format" => {
                cfg.format = Some(match v.as_str() {
                    "raw" => DiskFormat::Raw,
                    "qcow2" => DiskFormat::Qcow2,
                    _ => return Err(format!("disk: format='{v}' is not raw or qcow2")),
                })
            }
            _ => {
                return Err(unknown(
                    "disk",
                    k,
                    "path, readonly, num_queues, id, format, vhost_user, socket, queue_size",
                ));
            }
        }
    }
    cfg.vhost_user = vhost.finish("disk", DISK_QUEUE_SIZE, &image_keys)?;
    if cfg.vhost_user.is_none() {
        cfg.path = path.ok_or("disk: path=FILE is required (or vhost_user=true,socket=PATH)")?;
    }
    Ok(cfg)
}

/// A disk's number of request queues, checked.
pub(super) fn disk_queues(n: u16) -> Result<u16, String> {
    if (1..=MAX_DISK_QUEUES).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "disk: num_queues={n} is not a number from 1 to {MAX_DISK_QUEUES}"
        ))
    }
}

/// The serial a disk reports to GET_ID: what virtio-blk has room for.
pub(super) fn disk_serial(v: String) -> Result<String, String> {
    if (1..=20).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(v)
    } else {
        Err(format!(
            "disk: id='{v}' must be 1 to 20 printable ASCII characters"
        ))
    }
}

/// `--net tap=NAME[,mac=MAC][,num_queues=N]`: a virtio-net device on TAP interface NAME; or
/// `--net vhost_user=true,socket=PATH[,mac=MAC][,num_queues=N][,queue_size=N]`.
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut cfg = NetConfig {
        tap: String::new(),
        fds: Vec::new(),
        mac: None,
        num_queues: 2,
        vhost_user: None,
    };
    let mut tap = None;
    let mut vhost = VhostUserKeys::default();
    for (k, v) in pairs("net", text)? {
        if vhost.take("net", k, &v)? {
            continue;
        }
        match k {
            "tap" => {
                hyperpool_devices::virtio::net::tap::check_name(&v)
                    .map_err(|e| format!("net: {e}"))?;
                tap = Some(v);
            }
            "mac" => cfg.mac = Some(parse_mac(&v)?),
            "num_queues" => {
                cfg.num_queues = v
                    .parse::<u16>()
                    .map_err(|_| format!("net: num_queues='{v}' is not a number"))
                    .and_then(net_queues)?
            }
            _ => {
                return Err(unknown(
                    "net",
                    k,
                    "tap, mac, num_queues, vhost_user, socket, queue_size",
                ));
            }
        }
    }
    let conflicts: &[&str] = if tap.is_some() { &["tap"] } else { &[] };
    cfg.vhost_user = vhost.finish("net", NET_QUEUE_SIZE, conflicts)?;
    if cfg.vhost_user.is_none() {
        cfg.tap = tap.ok_or("net: tap=NAME is required (or vhost_user=true,socket=PATH)")?;
    }
    Ok(cfg)
}

/// A net device's number of queues, checked: an RX and a TX queue per pair.
pub(super) fn net_queues(n: u16) -> Result<u16, String> {
    if n % 2 == 0 && (2..=MAX_NET_QUEUES).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "net: num_queues={n} is not an even number from 2 to {MAX_NET_QUEUES} (an RX and a TX queue per pair)"
        ))
    }
}

/// `aa:bb:cc:dd:ee:ff` (or with `-`): a unicast MAC other than all zeroes.
pub(super) fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("net: mac='{text}' is not a MAC address like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("net: mac='{text}' is a multicast address"));
    }
    if mac == [0; 6] {
        return Err(format!("net: mac='{text}' is all zeroes"));
    }
    Ok(mac)
}

/// `--vsock cid=N,socket=PATH`: the guest's CID (at least 3) and the host-side Unix socket.
pub fn parse_vsock(text: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut socket) = (None, None);
    for (k, v) in pairs("vsock", text)? {
        match k {
            "cid" => {
                let n = v
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("vsock cid '{v}' is not a number"))?;
                if n < 3 {
                    return Err(format!(
                        "vsock cid must be at least 3 (0-2 are reserved), not {n}"
                    ));
                }
                cid = Some(n);
            }
            "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
            "socket" => return Err("vsock socket= needs a path".into()),
            _ => return Err(unknown("vsock", k, "cid, socket")),
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(VsockConfig { cid, socket }),
        _ => Err("--vsock needs cid=N,socket=PATH".into()),
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
        let t = c.template.unwrap();
        assert!(t.hides("cx16") && t.hides("xsave"));
        assert_eq!(
            parse_cpus("2").unwrap().template,
            None,
            "the host's default"
        );
        let none = parse_cpus("boot=1,features=none").unwrap().template;
        assert_eq!(
            none,
            Some(CpuTemplate::default()),
            "explicitly nothing hidden"
        );
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
        let m = parse_memory("size=4G,shared=on").unwrap();
        assert!(m.shared && m.size == 4 << 30);
        assert!(!parse_memory("4G").unwrap().shared);
        assert!(
            parse_memory("size=4G,shared=yes")
                .unwrap_err()
                .contains("shared='yes'")
        );
        assert!(
            parse_memory("size=4G,hugepages=on")
                .unwrap_err()
                .contains("unknown memory key 'hugepages'")
        );
        assert!(parse_memory("lots").is_err());
    }

    #[test]
    fn vsock_forms() {
        let v = parse_vsock("cid=3,socket=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.socket), (3, PathBuf::from("/tmp/v.sock")));
        assert!(
            parse_vsock("cid=2,socket=/x")
                .unwrap_err()
                .contains("at least 3")
        );
        assert!(
            parse_vsock("cid=x,socket=/x")
                .unwrap_err()
                .contains("not a number")
        );
        assert!(
            parse_vsock("cid=3")
                .unwrap_err()
                .contains("cid=N,socket=PATH")
        );
        assert!(parse_vsock("socket=/x").is_err());
        assert!(parse_vsock("cid=3,socket=").is_err());
        assert!(
            parse_vsock("cid=3,socket=/x,port=1")
                .unwrap_err()
                .contains("unknown vsock key 'port'")
        );
    }

    #[test]
    fn net_forms() {
        let n = parse_net("tap=hptap0").unwrap();
        assert_eq!((n.tap.as_str(), n.mac, n.num_queues), ("hptap0", None, 2));
        let n = parse_net("tap=t1,mac=52:54:00:AB:cd:01,num_queues=2").unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 1]));
        assert_eq!(parse_net("tap=t,num_queues=8").unwrap().num_queues, 8);
        assert_eq!(parse_net("tap=t,num_queues=32").unwrap().num_queues, 32);
        for (bad, why) in [
            ("mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("tap=", "1 to 15"),
            ("tap=a234567890123456", "1 to 15"),
            ("tap=a/b", "not a valid interface name"),
            ("tap=t,mac=52:54:00:12:34", "not a MAC"),
            ("tap=t,mac=52:54:00:12:34:56:78", "not a MAC"),
            ("tap=t,mac=52:54:00:12:34:zz", "not a MAC"),
            ("tap=t,mac=525400123456", "not a MAC"),
            ("tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("tap=t,mac=00:00:00:00:00:00", "all zeroes"),
            ("tap=t,num_queues=3", "not an even number from 2 to 32"),
            ("tap=t,num_queues=0", "not an even number"),
            ("tap=t,num_queues=34", "not an even number"),
            ("tap=t,num_queues=-2", "is not a number"),
            ("tap=t,vhost=on", "unknown net key 'vhost'"),
            ("tap=t,socket=/s", "need vhost_user=true"),
            ("vhost_user=true", "needs socket=PATH"),
            (
                "vhost_user=true,socket=/s,tap=t",
                "tap= does not go with vhost_user",
            ),
            (
                "vhost_user=true,socket=/s,queue_size=100",
                "queue_size='100'",
            ),
            ("vhost_user=maybe,socket=/s", "vhost_user='maybe'"),
        ] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let n = parse_net("vhost_user=true,socket=/run/n.sock,num_queues=4,mac=52:54:00:00:00:02")
            .unwrap();
        let vu = n.vhost_user.unwrap();
        assert_eq!((vu.socket, vu.queue_size), ("/run/n.sock".into(), 256));
        assert_eq!((n.tap.as_str(), n.num_queues), ("", 4));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0, 0, 2]));
    }

    #[test]
    fn vhost_user_disk_forms() {
        let d = parse_disk("vhost_user=true,socket=/run/d.sock,num_queues=2,id=data").unwrap();
        let vu = d.vhost_user.unwrap();
        assert_eq!((vu.socket, vu.queue_size), ("/run/d.sock".into(), 128));
        assert_eq!((d.num_queues, d.id.as_deref()), (2, Some("data")));
        assert_eq!(d.path, PathBuf::new());
        let d = parse_disk("vhost_user=on,socket=/s,queue_size=256").unwrap();
        assert_eq!(d.vhost_user.unwrap().queue_size, 256);
        assert!(
            parse_disk("vhost_user=false,path=/a")
                .unwrap()
                .vhost_user
                .is_none()
        );
        for (bad, why) in [
            ("vhost_user=true", "needs socket=PATH"),
            ("vhost_user=true,socket=", "needs a path"),
            (
                "vhost_user=true,socket=/s,path=/a",
                "path= does not go with vhost_user",
            ),
            (
                "vhost_user=true,socket=/s,readonly=on",
                "readonly= does not go",
            ),
            (
                "vhost_user=true,socket=/s,format=raw",
                "format= does not go",
            ),
            ("vhost_user=true,socket=/s,queue_size=0", "queue_size='0'"),
            (
                "vhost_user=true,socket=/s,queue_size=512",
                "not a power of two up to 256",
            ),
            ("path=/a,socket=/s", "need vhost_user=true"),
            ("path=/a,queue_size=64", "need vhost_user=true"),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: one line");
        }
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

    #[test]
    fn console_forms() {
        assert_eq!(parse_console("off").unwrap(), ConsoleConfig::Off);
        assert_eq!(parse_console("tty").unwrap(), ConsoleConfig::Tty);
        assert_eq!(
            parse_console("file=/tmp/c").unwrap(),
            ConsoleConfig::File("/tmp/c".into())
        );
        assert!(parse_console("file=").is_err());
        assert!(parse_console("pty").is_err());
        assert_eq!(
            super::super::VmConfig::default().console,
            ConsoleConfig::Off
        );
    }

    #[test]
    fn disk_forms() {
        let d = parse_disk("path=/img/a.raw").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(!d.readonly && d.num_queues == 1 && d.id.is_none());
        let d = parse_disk("path=b.raw,readonly=on,num_queues=4,id=data-1").unwrap();
        assert!(d.readonly);
        assert_eq!(d.num_queues, 4);
        assert_eq!(d.id.as_deref(), Some("data-1"));
        for (bad, why) in [
            ("readonly=on", "path=FILE is required"),
            ("path=", "needs a file"),
            ("path=a,num_queues=0", "num_queues=0 is not"),
            ("path=a,num_queues=65", "num_queues=65 is not"),
            ("path=a,num_queues=x", "num_queues='x'"),
            ("path=a,readonly=maybe", "readonly='maybe'"),
            ("path=a,id=123456789012345678901", "1 to 20"),
            ("path=a,id=", "1 to 20"),
            ("path=a,cache=none", "unknown disk key 'cache'"),
            ("a.raw", "not key=value"),
        ] {
            let e = parse_disk(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
