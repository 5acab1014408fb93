//! The guest tools rebuild from the `.deb` cache alone when apt cannot answer (no package
//! lists, no mirror): the packages of the last good build are named in the cache's manifest.
//! Needs a cache a previous build filled (scripts/test.sh builds the guest first and sets
//! HYPERPOOL_GUEST_CACHE); skips otherwise.

use std::path::PathBuf;

use hyperpool_guest_images::tools::{TOOLS_ARCHIVE, build_tools};

#[test]
fn tools_rebuild_from_the_cache_without_apt() {
    let Some(cache) = std::env::var_os("HYPERPOOL_GUEST_CACHE").map(PathBuf::from) else {
        eprintln!("skipping: HYPERPOOL_GUEST_CACHE is not set");
        return;
    };
    if !cache.join("tools-packages.txt").is_file() {
        eprintln!("skipping: no tools manifest in {}", cache.display());
        return;
    }
    // An apt-cache that fails as it does without lists, first on PATH. dpkg stays the real one.
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join("apt-cache");
    std::fs::write(&fake, "#!/bin/sh\necho 'E: no lists' >&2\nexit 100\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // SAFETY: this binary's only test, and nothing else in the process reads the environment
    // concurrently (the commands get a copy at spawn).
    unsafe { std::env::set_var("PATH", path) };

    let out = tempfile::tempdir().unwrap();
    let staging = out.path().join("staging");
    let mut log = Vec::new();
    let tools = build_tools(out.path(), &cache, &staging, &mut |m: &str| {
        log.push(m.to_owned())
    })
    .unwrap_or_else(|e| panic!("offline rebuild failed: {e}\n{log:#?}"));
    assert!(out.path().join(TOOLS_ARCHIVE).is_file());
    assert!(
        log.iter().any(|m| m.contains("apt lists unavailable")),
        "the cached .debs were used: {log:#?}"
    );
    for pkg in ["fio", "iperf3", "e2fsprogs", "libc6"] {
        assert!(tools.packages.iter().any(|p| p == pkg), "{pkg}: {log:#?}");
    }
}
