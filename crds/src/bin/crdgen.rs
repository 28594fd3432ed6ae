//! `crdgen`: prints the ConnectionPool CRD YAML generated from the Rust types.
//!
//! ```text
//! crdgen            print the YAML
//! crdgen --write    write every committed copy (crds/, charts/tether/crds/, docs/crd.md)
//! crdgen --check    exit 1, naming the stale copies, if any differs from the types
//! ```
//! `--root DIR` points at the repository root (default: the workspace this crate is in).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut mode = "print";
    let mut root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--write" => mode = "write",
            "--check" => mode = "check",
            "--root" => match args.next() {
                Some(dir) => root = PathBuf::from(dir),
                None => return usage("--root needs a directory"),
            },
            "-h" | "--help" => {
                println!("usage: crdgen [--write | --check] [--root DIR]");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    match mode {
        "write" => {
            for (rel, content) in tether_crds::generated() {
                let path = root.join(rel);
                if let Some(dir) = path.parent()
                    && let Err(err) = std::fs::create_dir_all(dir)
                {
                    eprintln!("crdgen: creating {}: {err}", dir.display());
                    return ExitCode::FAILURE;
                }
                if let Err(err) = std::fs::write(&path, &content) {
                    eprintln!("crdgen: writing {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("crdgen: wrote {rel}");
            }
            ExitCode::SUCCESS
        }
        "check" => {
            let stale = tether_crds::check_generated(&root);
            if stale.is_empty() {
                eprintln!("crdgen: generated CRD YAML is current");
                ExitCode::SUCCESS
            } else {
                for rel in stale {
                    eprintln!(
                        "crdgen: {rel} differs from the types; run `cargo run -p tether-crds --bin crdgen -- --write`"
                    );
                }
                ExitCode::FAILURE
            }
        }
        _ => {
            print!("{}", tether_crds::crd_yaml());
            ExitCode::SUCCESS
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("crdgen: {msg}\nusage: crdgen [--write | --check] [--root DIR]");
    ExitCode::from(2)
}
