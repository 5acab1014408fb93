//! Builds a Debian guest: `cargo run -p hyperpool-guest-images --example build_debian -- DIR`.
//! HYPERPOOL_GUEST_CACHE, if set, is used as the .deb cache (default DIR/cache).

use hyperpool_guest_images::{DebianOptions, build_debian_with};

fn main() -> std::process::ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: build_debian DIR");
        return std::process::ExitCode::from(2);
    };
    let opts = DebianOptions {
        cache_dir: std::env::var_os("HYPERPOOL_GUEST_CACHE").map(Into::into),
    };
    match build_debian_with(dir.as_ref(), &opts, &mut |m: &str| eprintln!("{m}")) {
        Ok(g) => {
            println!("{g:#?}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
