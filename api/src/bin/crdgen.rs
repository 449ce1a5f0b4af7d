//! Writes Ferry's CRDs as YAML: `crdgen [DIR...]` (default `crds`, `charts/ferry/crds` and
//! `deploy`, the GitOps kustomization's own copy), one file per kind; `crdgen --check [DIR...]` fails when a file
//! differs from what the code generates.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let check = if let Some(pos) = args.iter().position(|a| a == "--check") {
        args.remove(pos);
        true
    } else {
        false
    };
    let dirs: Vec<PathBuf> = if args.is_empty() {
        vec!["crds".into(), "charts/ferry/crds".into(), "deploy".into()]
    } else {
        args.into_iter().map(PathBuf::from).collect()
    };
    let mut failed = false;
    for dir in &dirs {
        for (file, yaml) in ferry_api::manifest::crd_files() {
            let path = dir.join(&file);
            let result = if check {
                match std::fs::read_to_string(&path) {
                    Ok(existing) if existing == yaml => Ok(()),
                    Ok(_) => Err(format!(
                        "{} is out of date: run `cargo run -p ferry-api --bin crdgen`",
                        path.display()
                    )),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                }
            } else {
                std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::write(&path, &yaml))
                    .map(|()| println!("wrote {}", path.display()))
                    .map_err(|e| format!("{}: {e}", path.display()))
            };
            if let Err(message) = result {
                eprintln!("crdgen: {message}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
