//! virtio-console end to end: the probe guest writes a line through virtio-drivers'
//! `VirtIOConsole`, and with `--console file=PATH` the line is in the file while COM1 still
//! carries the probe's report.

mod common;

use common::*;

#[test]
fn guest_line_reaches_the_console_file() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("hp-console-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let spec = format!("file={}", path.display());
    let f = run(
        &[
            "run",
            "--serial",
            "tty",
            "--cmdline",
            "probe=console",
            "--console",
            &spec,
        ],
        PROBE_LIMIT,
    );
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    assert!(
        f.probe_ok("console").ends_with("bytes=25"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
    assert_eq!(written, "hyperpool-virtio-console\n", "{}", f.describe());
    assert!(
        !f.stdout.contains("hyperpool-virtio-console"),
        "console output leaked to COM1/stdout\n{}",
        f.describe()
    );
}

#[test]
fn without_console_the_check_fails_cleanly() {
    if !kvm_available() {
        return;
    }
    let f = run(
        &["run", "--serial", "tty", "--cmdline", "probe=console"],
        PROBE_LIMIT,
    );
    let line = f.probe_line("console").unwrap_or_default().to_string();
    assert!(
        line.contains("FAIL no virtio 1.x console"),
        "{}",
        f.describe()
    );
    assert_eq!(f.code(), 0, "{}", f.describe());
}
