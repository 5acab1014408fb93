//! Dumps the default tables for inspection with `iasl -d`:
//! `cargo run -p hyperpool-acpi --example dump -- OUT_DIR [CPUS]`.

use hyperpool_acpi::{AcpiConfig, build};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: dump OUT_DIR [CPUS]")?;
    let cpus = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2);
    let tables = build(&AcpiConfig {
        cpus,
        ..AcpiConfig::default()
    })?;
    tables.dump(std::path::Path::new(&dir))?;
    for t in &tables.tables {
        let sig = String::from_utf8_lossy(&t.signature);
        println!("{sig} at {:#x}, {} bytes", t.addr, t.bytes.len());
    }
    Ok(())
}
