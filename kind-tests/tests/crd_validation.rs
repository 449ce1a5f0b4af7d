//! The CRDs, installed in a real kube-apiserver: every example is accepted, every invalid
//! resource in the table is rejected with a message naming the field, and `kubectl get` /
//! `kubectl explain` show what users expect.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use ferry_kind_tests::{CRDS_DIR, ControlPlane};

/// `kubectl apply --dry-run=server --validate=strict` of one YAML text; returns
/// (succeeded, stdout + stderr).
async fn dry_run_apply(cp: &ControlPlane, name: &str, yaml: &str) -> Result<(bool, String)> {
    let file = cp.dir().join(format!("dry-run-{name}.yaml"));
    std::fs::write(&file, yaml).with_context(|| format!("writing {}", file.display()))?;
    let out = cp
        .kubectl([
            "apply".as_ref(),
            "--dry-run=server".as_ref(),
            "--validate=strict".as_ref(),
            "-f".as_ref(),
            file.as_os_str(),
        ])
        .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

async fn ready_control_plane() -> Result<&'static ControlPlane> {
    let cp = ControlPlane::shared().await?;
    println!("{}", cp.start_report().trim_end());
    cp.install_crds(CRDS_DIR).await?;
    Ok(cp)
}

fn topic(spec: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata:\n  name: t\n  namespace: default\nspec:\n{spec}"
    )
}
fn group(spec: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata:\n  name: g\n  namespace: default\nspec:\n{spec}"
    )
}
fn subscription(spec: &str) -> String {
    format!(
        "apiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata:\n  name: s\n  namespace: default\nspec:\n{spec}"
    )
}

const SELECTOR: &str = "  selector:\n    matchLabels:\n      app: billing\n";
const TOPIC_GROUP: &str = "  topic: orders\n  group: billing\n";

#[tokio::test]
async fn invalid_resources_are_rejected_naming_the_field() -> Result<()> {
    let cp = ready_control_plane().await?;
    // (case, YAML, text the rejection must contain: the field path)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown durability",
            topic("  durability: Fast\n"),
            "spec.durability",
        ),
        (
            "replicas on a Memory topic",
            topic("  durability: Memory\n  replicas: 3\n"),
            "spec.replicas",
        ),
        (
            "Replicated with one replica",
            topic("  durability: Replicated\n  replicas: 1\n"),
            "spec.replicas",
        ),
        (
            "replicas above 5",
            topic("  durability: Replicated\n  replicas: 9\n"),
            "spec.replicas",
        ),
        (
            "zero maxMessageBytes",
            topic("  maxMessageBytes: 0\n"),
            "spec.maxMessageBytes",
        ),
        (
            "maxMessageBytes above 4 MiB",
            topic("  maxMessageBytes: 10485760\n"),
            "spec.maxMessageBytes",
        ),
        (
            "malformed dedupWindow",
            topic("  dedupWindow: two minutes\n"),
            "spec.dedupWindow",
        ),
        (
            "malformed retention.maxBytes",
            topic("  retention:\n    maxBytes: lots\n"),
            "spec.retention.maxBytes",
        ),
        (
            "unknown field under strict validation",
            topic("  partitions: 3\n"),
            "spec.partitions",
        ),
        ("wrong type", topic("  replicas: three\n"), "spec.replicas"),
        ("empty selector", group("  selector: {}\n"), "spec.selector"),
        (
            "missing selector",
            group("  delivery: Unicast\n"),
            "spec.selector",
        ),
        (
            "unknown delivery",
            group(&format!("{SELECTOR}  delivery: Multicast\n")),
            "spec.delivery",
        ),
        (
            "unknown zonePolicy",
            group(&format!("{SELECTOR}  zonePolicy: Nearest\n")),
            "spec.zonePolicy",
        ),
        (
            "balancing on a Broadcast group",
            group(&format!(
                "{SELECTOR}  delivery: Broadcast\n  balancing: RoundRobin\n"
            )),
            "spec.balancing",
        ),
        (
            "missing topic",
            subscription("  group: billing\n"),
            "spec.topic",
        ),
        (
            "missing group",
            subscription("  topic: orders\n"),
            "spec.group",
        ),
        (
            "malformed topic name",
            subscription("  topic: Bad_Name\n  group: billing\n"),
            "spec.topic",
        ),
        (
            "negative maxDeliveries",
            subscription(&format!("{TOPIC_GROUP}  maxDeliveries: -1\n")),
            "spec.maxDeliveries",
        ),
        (
            "malformed ackWait",
            subscription(&format!("{TOPIC_GROUP}  ackWait: \"10\"\n")),
            "spec.ackWait",
        ),
        (
            "zero ackWait",
            subscription(&format!("{TOPIC_GROUP}  ackWait: 0s\n")),
            "spec.ackWait",
        ),
        (
            "unknown qos",
            subscription(&format!("{TOPIC_GROUP}  qos: Maybe\n")),
            "spec.qos",
        ),
        (
            "backoff max below initial",
            subscription(&format!(
                "{TOPIC_GROUP}  backoff:\n    initial: 10s\n    max: 1s\n"
            )),
            "spec.backoff.max",
        ),
        (
            "backoff multiplier below 1",
            subscription(&format!("{TOPIC_GROUP}  backoff:\n    multiplier: 0.5\n")),
            "spec.backoff.multiplier",
        ),
        (
            "dead letters on AtMostOnce",
            subscription(&format!(
                "{TOPIC_GROUP}  qos: AtMostOnce\n  deadLetterTopic: orders-dlq\n"
            )),
            "spec.deadLetterTopic",
        ),
        (
            "dead-letter topic is the topic",
            subscription(&format!("{TOPIC_GROUP}  deadLetterTopic: orders\n")),
            "spec.deadLetterTopic",
        ),
        (
            "zero maxInFlight",
            subscription(&format!("{TOPIC_GROUP}  maxInFlight: 0\n")),
            "spec.maxInFlight",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (case, yaml, field)) in cases.iter().enumerate() {
        let (accepted, output) = dry_run_apply(cp, &format!("invalid-{i}"), yaml).await?;
        let verdict = if accepted {
            "ACCEPTED (should be rejected)"
        } else if output.contains(field) {
            "rejected"
        } else {
            "rejected without naming the field"
        };
        println!(
            "{case:<40} {verdict}: {}",
            output.trim().lines().last().unwrap_or("")
        );
        if verdict != "rejected" {
            failures.push(format!(
                "{case}: expected a rejection naming {field}, got: {}",
                output.trim()
            ));
        }
    }
    println!(
        "{} invalid resources, {} rejected as expected",
        cases.len(),
        cases.len() - failures.len()
    );
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Kubernetes documents (Ferry resources, Namespaces) of every example; other files beside
/// them, such as the local-mode pod list, are not Kubernetes objects.
fn example_files() -> Result<Vec<PathBuf>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    for dir in std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir)? {
            let file = file?.path();
            let is_yaml = matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            );
            if is_yaml && std::fs::read_to_string(&file)?.contains("apiVersion: ferry.dev/") {
                files.push(file);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() -> Result<()> {
    let cp = ready_control_plane().await?;
    let files = example_files()?;
    ensure!(!files.is_empty(), "no example YAML found");
    for file in &files {
        let yaml = std::fs::read_to_string(file)?;
        let (accepted, output) = dry_run_apply(cp, "example", &yaml).await?;
        println!("{}: {}", file.display(), output.trim());
        ensure!(accepted, "{} was rejected: {output}", file.display());
    }
    Ok(())
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_explains_fields() -> Result<()> {
    let cp = ready_control_plane().await?;
    let ns = "printer-columns";
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\n{}\n---\n{}\n---\n{}",
        topic("  durability: DiskAsync\n").replace("default", ns),
        group(SELECTOR).replace("default", ns),
        subscription(TOPIC_GROUP)
            .replace("name: s", "name: billing-orders")
            .replace("default", ns),
    );
    let file = cp.dir().join("printer-columns.yaml");
    std::fs::write(&file, yaml)?;
    let applied = cp
        .kubectl(["apply".as_ref(), "-f".as_ref(), file.as_os_str()])
        .await?;
    ensure!(
        applied.status.success(),
        "apply failed: {}",
        String::from_utf8_lossy(&applied.stderr)
    );

    let get = cp
        .kubectl(["get", "topics,consumergroups,subscriptions", "-n", ns])
        .await?;
    let table = String::from_utf8_lossy(&get.stdout);
    println!("{table}");
    ensure!(
        get.status.success(),
        "kubectl get failed: {}",
        String::from_utf8_lossy(&get.stderr)
    );
    for column in [
        "DURABILITY",
        "ORDERING",
        "REPLICAS",
        "DELIVERY",
        "ZONES",
        "MEMBERS",
        "TOPIC",
        "GROUP",
        "QOS",
        "READY",
    ] {
        ensure!(table.contains(column), "no {column} column in:\n{table}");
    }
    ensure!(
        table.contains("DiskAsync"),
        "the topic's durability is not shown:\n{table}"
    );
    ensure!(
        table.contains("PreferSameZone"),
        "defaults are not applied:\n{table}"
    );

    let by_category = cp.kubectl(["get", "ferry", "-n", ns, "-o", "name"]).await?;
    let names = String::from_utf8_lossy(&by_category.stdout);
    ensure!(
        names.lines().count() == 3,
        "`kubectl get ferry` listed:\n{names}"
    );
    let short = cp.kubectl(["get", "fsub", "-n", ns, "-o", "name"]).await?;
    ensure!(
        String::from_utf8_lossy(&short.stdout).contains("billing-orders"),
        "short name fsub does not work"
    );

    let explain = cp.kubectl(["explain", "topic.spec.durability"]).await?;
    let text = String::from_utf8_lossy(&explain.stdout);
    println!("{text}");
    ensure!(
        explain.status.success(),
        "kubectl explain failed: {}",
        String::from_utf8_lossy(&explain.stderr)
    );
    ensure!(
        text.contains("group commit"),
        "explain does not show the field's doc:\n{text}"
    );
    Ok(())
}
