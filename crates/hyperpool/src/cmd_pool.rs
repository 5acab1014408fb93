//! The pool daemon's client commands: `create`, `start`, `stop`, `ls`, `inspect`, ... Each is one
//! REST call; output is a table for people or JSON (`--json`) for scripts.

use std::path::Path;
use std::time::Duration;

use hyperpool_api::client::{Client, Response};
use hyperpool_api::pool::{
    ApiError, DiskSpec, NetSpec, PoolInfo, RestartPolicy, VmDetails, VmRecord, VmSpec, VsockSpec,
};
use hyperpool_vmm::config::{DiskFormat, parse_disk};
use serde_json::Value;

use crate::Failure;
use crate::cli::{ClientArgs, CreateArgs, LogsArgs, RestartArg, VmRef};

fn client(args: &ClientArgs) -> Client {
    // Stop waits for the guest (up to the daemon's stop timeout).
    Client::new(&args.socket).with_timeout(Duration::from_secs(120))
}

/// One request; a refusal becomes the daemon's one line, exit 2 for the user's mistakes.
fn call(
    args: &ClientArgs,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, Failure> {
    let r = client(args).request(method, path, body).map_err(|e| {
        Failure::runtime(format!(
            "{e} (is 'hyperpool serve' running? set --socket or HYPERPOOL_SOCKET)"
        ))
    })?;
    if r.is_success() {
        return Ok(r);
    }
    let message = r
        .json::<ApiError>()
        .map(|e| e.error)
        .unwrap_or_else(|_| r.text());
    Err(if (400..500).contains(&r.status) {
        Failure::usage(message)
    } else {
        Failure::runtime(message)
    })
}

fn print_json(v: &impl serde::Serialize) -> Result<u8, Failure> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::runtime(e.to_string()))?;
    println!("{text}");
    Ok(0)
}

fn decode<T: serde::de::DeserializeOwned>(r: &Response) -> Result<T, Failure> {
    r.json().map_err(|e| Failure::runtime(e.to_string()))
}

pub fn create(args: CreateArgs) -> Result<u8, Failure> {
    let spec = spec_from(&args)?;
    let path = if args.start {
        "/v1/vms?start=true"
    } else {
        "/v1/vms"
    };
    if args.start && !args.client.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("starting {} ...", spec.name);
    }
    let body = serde_json::to_vec(&spec).map_err(|e| Failure::runtime(e.to_string()))?;
    let r = call(&args.client, "POST", path, Some(body))?;
    let record: VmRecord = decode(&r)?;
    if args.client.json {
        return print_json(&record);
    }
    println!("{} {}", record.spec.name, status_word(&record));
    Ok(0)
}

/// The spec: the file (if any), then the flags on top.
fn spec_from(args: &CreateArgs) -> Result<VmSpec, Failure> {
    let mut spec = match &args.spec {
        Some(path) => read_spec(path)?,
        None => VmSpec {
            cpus: 1,
            memory_mib: 512,
            ..VmSpec::default()
        },
    };
    if let Some(name) = &args.name {
        spec.name = name.clone();
    }
    if spec.name.is_empty() {
        return Err(Failure::usage(
            "give the VM a name: hyperpool create NAME [...]",
        ));
    }
    if let Some(c) = &args.cpus {
        spec.cpus = c.boot;
        spec.cpu_features = c.template.as_ref().map(|t| t.to_string());
    }
    if let Some(m) = &args.memory {
        if m.size % (1 << 20) != 0 {
            return Err(Failure::usage("--memory: give a whole number of MiB"));
        }
        spec.memory_mib = m.size >> 20;
    }
    let text = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| absolute(p));
    if args.kernel.is_some() {
        spec.kernel = text(&args.kernel);
    }
    if args.initramfs.is_some() {
        spec.initramfs = text(&args.initramfs);
    }
    if args.cmdline.is_some() {
        spec.cmdline = args.cmdline.clone();
    }
    for d in &args.disks {
        spec.disks.push(disk_spec(d).map_err(Failure::usage)?);
    }
    for n in &args.nets {
        if n.vhost_user.is_some() {
            return Err(Failure::usage(
                "--net: vhost_user=true is for `hyperpool run` and the per-VM API; pool VMs take tap=NAME",
            ));
        }
        spec.nets.push(NetSpec {
            tap: n.tap.clone(),
            mac: n.mac.map(|m| {
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            }),
            num_queues: Some(n.num_queues),
        });
    }
    if let Some(v) = &args.vsock {
        spec.vsock = Some(VsockSpec {
            cid: v.cid,
            socket: absolute(&v.socket),
        });
    }
    spec.rng |= args.rng;
    spec.device_processes |= args.device_processes;
    if let Some(r) = args.restart {
        spec.restart = match r {
            RestartArg::Never => RestartPolicy::Never,
            RestartArg::OnFailure => RestartPolicy::OnFailure,
            RestartArg::Always => RestartPolicy::Always,
        };
    }
    Ok(spec)
}

/// Paths go to the daemon, which does not share our working directory.
fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn read_spec(path: &Path) -> Result<VmSpec, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("--spec {}: {e}", path.display())))?;
    let is_json = text.trim_start().starts_with('{');
    let parsed = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str(&text).map_err(|e| e.message().to_string())
    };
    parsed.map_err(|e| Failure::usage(format!("--spec {}: {e}", path.display())))
}

/// `--disk`: the `run` grammar, plus `base=FILE` for an overlay.
fn disk_spec(text: &str) -> Result<DiskSpec, String> {
    let base = text
        .split(',')
        .find_map(|kv| kv.strip_prefix("base="))
        .map(str::to_string);
    let as_path = text
        .split(',')
        .map(|kv| match kv.strip_prefix("base=") {
            Some(v) => format!("path={v}"),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    let d = parse_disk(&as_path)?;
    if d.vhost_user.is_some() {
        return Err(
            "--disk: vhost_user=true is for `hyperpool run` and the per-VM API; pool VMs take path= or base="
                .into(),
        );
    }
    let path = absolute(&d.path);
    Ok(DiskSpec {
        path: base.is_none().then(|| path.clone()),
        base: base.map(|_| path),
        format: d.format.map(|f| match f {
            DiskFormat::Raw => "raw".to_string(),
            DiskFormat::Qcow2 => "qcow2".to_string(),
        }),
        readonly: d.readonly,
        num_queues: Some(d.num_queues),
        serial: d.id,
    })
}

fn status_word(r: &VmRecord) -> String {
    serde_json::to_value(r.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// start, pause, resume, restart, stop, kill: POST and show the new status.
pub fn lifecycle(action: &str, vm: VmRef) -> Result<u8, Failure> {
    let r = call(
        &vm.client,
        "POST",
        &format!("/v1/vms/{}/{action}", vm.name),
        None,
    )?;
    let record: VmRecord = decode(&r)?;
    if vm.client.json {
        return print_json(&record);
    }
    println!("{} {}", record.spec.name, status_word(&record));
    Ok(0)
}

pub fn rm(vm: VmRef) -> Result<u8, Failure> {
    call(&vm.client, "DELETE", &format!("/v1/vms/{}", vm.name), None)?;
    if !vm.client.json {
        println!("{} removed", vm.name);
    }
    Ok(0)
}

pub fn ls(args: ClientArgs) -> Result<u8, Failure> {
    let r = call(&args, "GET", "/v1/vms", None)?;
    let vms: Vec<VmRecord> = decode(&r)?;
    if args.json {
        return print_json(&vms);
    }
    println!(
        "{:<24} {:<8} {:>4} {:>8} {:>8}  LAST EXIT",
        "NAME", "STATUS", "CPUS", "MEMORY", "PID"
    );
    for v in vms {
        println!(
            "{:<24} {:<8} {:>4} {:>7}M {:>8}  {}",
            v.spec.name,
            status_word(&v),
            v.spec.cpus,
            v.spec.memory_mib,
            v.pid.map_or("-".to_string(), |p| p.to_string()),
            v.last_exit.as_deref().unwrap_or("")
        );
    }
    Ok(0)
}

pub fn inspect(vm: VmRef) -> Result<u8, Failure> {
    let r = call(&vm.client, "GET", &format!("/v1/vms/{}", vm.name), None)?;
    let d: VmDetails = decode(&r)?;
    if vm.client.json {
        return print_json(&d);
    }
    let rec = &d.record;
    println!("name:      {}", rec.spec.name);
    println!("status:    {}", status_word(rec));
    println!("cpus:      {}", rec.spec.cpus);
    println!("memory:    {} MiB", rec.spec.memory_mib);
    println!(
        "kernel:    {}",
        rec.spec
            .kernel
            .as_deref()
            .unwrap_or("(built-in probe guest)")
    );
    if let Some(pid) = rec.pid {
        println!("vmm pid:   {pid}");
    }
    println!("restarts:  {}", rec.restarts);
    if let Some(e) = &rec.last_exit {
        println!("last exit: {e}");
    }
    if let Some(l) = &d.live {
        println!("uptime:    {:.1} s", l.uptime_ms as f64 / 1000.0);
        println!("cpu time:  {:.2} s", l.cpu_time_ms as f64 / 1000.0);
        println!(
            "guest mem: {:.1} MiB resident",
            l.resident_guest_bytes as f64 / 1048576.0
        );
        println!("vmm rss:   {:.1} MiB", l.vmm_rss_bytes as f64 / 1048576.0);
        println!("vm exits:  {} ({:.0}/s)", l.vm_exits, l.vm_exits_per_sec);
        for (dev, counters) in &l.devices {
            let figures: Vec<String> = counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{dev:<10} {}", figures.join(" "));
        }
    }
    Ok(0)
}

pub fn logs(args: LogsArgs) -> Result<u8, Failure> {
    let q = args.bytes.map_or(String::new(), |b| format!("?bytes={b}"));
    let r = call(
        &args.client,
        "GET",
        &format!("/v1/vms/{}/logs{q}", args.name),
        None,
    )?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(&r.body)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(0)
}

pub fn pool(args: ClientArgs) -> Result<u8, Failure> {
    let r = call(&args, "GET", "/v1/pool", None)?;
    let p: PoolInfo = decode(&r)?;
    if args.json {
        return print_json(&p);
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "cpu:    {} vCPUs given of {} ({} cores x {}), {} free",
        p.allocated_vcpus,
        (f64::from(p.host_cores) * p.cpu_overcommit) as u64,
        p.host_cores,
        p.cpu_overcommit,
        p.free_vcpus
    );
    println!(
        "memory: {} MiB given of {} ({} MiB x {}), {} MiB free",
        p.allocated_memory_mib,
        (p.host_memory_mib as f64 * p.memory_overcommit) as u64,
        p.host_memory_mib,
        p.memory_overcommit,
        p.free_memory_mib
    );
    println!(
        "disk:   {:.1} GiB free of {:.1} GiB",
        gib(p.disk_free_bytes),
        gib(p.disk_total_bytes)
    );
    println!("vms:    {} ({} running)", p.vms, p.running);
    Ok(0)
}

/// The console socket of a running VM, from the daemon.
pub fn console_socket(vm: &VmRef) -> Result<String, Failure> {
    let r = call(&vm.client, "GET", &format!("/v1/vms/{}", vm.name), None)?;
    let d: Value = decode(&r)?;
    d["console_socket"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Failure::usage(format!("{} is not running (start it first)", vm.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flags_become_specs() {
        let d = disk_spec("base=/img/b.raw,readonly=on").unwrap();
        assert_eq!(d.base.as_deref(), Some("/img/b.raw"));
        assert!(d.path.is_none() && d.readonly);
        let d = disk_spec("path=/img/a.qcow2,format=qcow2,id=data").unwrap();
        assert_eq!(d.path.as_deref(), Some("/img/a.qcow2"));
        assert_eq!(d.format.as_deref(), Some("qcow2"));
        assert_eq!(d.serial.as_deref(), Some("data"));
        assert!(disk_spec("readonly=on").is_err());
    }
}
