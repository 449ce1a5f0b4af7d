//! Every example under `examples/` applied with `kubectl` to the real API server turns
//! Ready, as `kubectl wait --for=condition=Ready` sees it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, ensure};
use ferry_api::ConsumerGroup;
use ferry_kind_tests::ControlPlane;

use crate::faults::world_on;
use crate::support::*;

/// The repository's examples.
const EXAMPLES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");

/// The Ferry kinds, as `kubectl` names their resources.
const RESOURCES: &str = "topics.ferry.dev,consumergroups.ferry.dev,subscriptions.ferry.dev";

/// An example's YAML files that hold Kubernetes objects (top-level `apiVersion` and
/// `kind`); `pods.yaml` (a list of local pods for `ferryctl dev`) is not one.
fn manifests(folder: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| {
        p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
    });
    files.sort();
    let mut objects = Vec::new();
    let mut others = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let has = |key: &str| text.lines().any(|l| l.starts_with(key));
        if has("apiVersion:") && has("kind:") {
            objects.push(file);
        } else {
            others.push(file);
        }
    }
    Ok((objects, others))
}

#[tokio::test]
async fn examples_become_ready() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let mut folders: Vec<PathBuf> = std::fs::read_dir(EXAMPLES_DIR)
        .with_context(|| format!("reading {EXAMPLES_DIR}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    folders.retain(|p| {
        p.is_dir()
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    folders.sort();
    ensure!(!folders.is_empty(), "no example folders in {EXAMPLES_DIR}");
    let scratch = tempfile::tempdir()?;

    // Each example in a namespace of its own (they all say `namespace: default` and reuse
    // names), with an operator of its own watching that namespace.
    let mut applied = Vec::new();
    for folder in &folders {
        let example = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (objects, others) = manifests(folder)?;
        for other in &others {
            println!(
                "{example}: skipping {} (not Kubernetes objects)",
                other.display()
            );
        }
        if objects.is_empty() {
            println!("{example}: no Kubernetes objects");
            continue;
        }
        let world = world_on(cp, &format!("ex-{example}")).await?;
        let operator = Operator::start(world.config(&format!("op-ex-{example}"))).await?;
        let mut expected = 0;
        for file in &objects {
            let text = std::fs::read_to_string(file)?
                .replace("namespace: default", &format!("namespace: {}", world.ns));
            expected += text
                .lines()
                .filter(|l| {
                    matches!(
                        l.trim_end(),
                        "kind: Topic" | "kind: ConsumerGroup" | "kind: Subscription"
                    )
                })
                .count();
            let copy = scratch.path().join(format!(
                "{example}-{}",
                file.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            std::fs::write(&copy, text)?;
            let out = cp
                .kubectl([
                    "apply".as_ref(),
                    "-n".as_ref(),
                    world.ns.as_ref(),
                    "-f".as_ref(),
                    copy.as_os_str(),
                ])
                .await?;
            ensure!(
                out.status.success(),
                "kubectl apply -f {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            print!("{example}: {}", String::from_utf8_lossy(&out.stdout));
        }
        applied.push((example, world, operator, expected));
    }

    let mut total = 0;
    for (example, world, _, expected) in &applied {
        let out = cp
            .kubectl([
                "wait",
                "--for=condition=Ready",
                "--timeout=60s",
                RESOURCES,
                "--all",
                "-n",
                &world.ns,
            ])
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        print!("{example}: {stdout}");
        ensure!(
            out.status.success(),
            "{example}: kubectl wait failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let met = stdout
            .lines()
            .filter(|l| l.ends_with("condition met"))
            .count();
        ensure!(
            met == *expected,
            "{example}: {met} objects Ready, {expected} in the manifests"
        );
        total += met;

        // A group with no pods: Ready (it is in the table and waits for members), 0 members,
        // and the message says so.
        for g in world
            .api::<ConsumerGroup>()
            .list(&Default::default())
            .await?
        {
            let name = g.metadata.name.clone().unwrap_or_default();
            let status = g.status.clone().context("group status")?;
            let cond = ready(&status.conditions).context("Ready condition")?;
            println!(
                "{example}: group {name}: Ready={} reason={} members={} message={:?}",
                cond.status, cond.reason, status.members, cond.message
            );
            ensure!(cond.status == "True" && status.members == 0 && status.ready_members == 0);
            ensure!(
                cond.observed_generation == g.metadata.generation,
                "{example}: group {name} Ready for an old generation"
            );
            ensure!(
                cond.message.contains("0 of 0 members ready"),
                "{example}: group {name}: {cond:?}"
            );
        }
    }
    println!("{} examples, {total} objects Ready", applied.len());
    ensure!(
        applied.len() == folders.len(),
        "every example folder has objects"
    );
    for (_, _, operator, _) in applied {
        operator.stop().await?;
    }
    Ok(())
}
