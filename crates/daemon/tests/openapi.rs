//! docs/pool-api.yaml and the server agree: every documented operation is served, and every
//! served route is documented.

use std::collections::BTreeSet;

use hyperpool_daemon::{OPENAPI, ROUTES};

/// (METHOD, path) of every operation in the document, read from its `paths:` block (two-space
/// indented paths, four-space indented methods).
fn documented() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in OPENAPI.lines() {
        if !line.starts_with(' ') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = line.strip_prefix("    ")
            && let Some(method) = m.strip_suffix(':')
            && ["get", "post", "put", "delete", "patch"].contains(&method)
        {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_every_documented_route_is_served() {
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let doc = documented();
    assert!(
        doc.len() >= 10,
        "parsed too little of the document: {doc:?}"
    );
    let undocumented: Vec<_> = served.difference(&doc).collect();
    let unserved: Vec<_> = doc.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
}
