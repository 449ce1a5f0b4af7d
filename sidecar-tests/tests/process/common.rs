//! Small builders for the CR and pods YAML the tests start meshes with.

use std::time::Duration;

use ferry_sidecar_tests::history::{Counts, Expect, History};

/// A Topic document; `spec` is a YAML flow mapping's inside, e.g. `durability: Disk`.
pub fn topic(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Topic\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n"
    )
}

/// A ConsumerGroup of the pods labelled `app: <app>`; `spec` adds fields.
pub fn group(name: &str, app: &str, spec: &str) -> String {
    let sep = if spec.is_empty() { "" } else { ", " };
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: ConsumerGroup\nmetadata: {{name: {name}}}\nspec: {{selector: {{matchLabels: {{app: {app}}}}}{sep}{spec}}}\n"
    )
}

/// A Subscription; `spec` adds fields.
pub fn subscription(name: &str, topic: &str, group: &str, spec: &str) -> String {
    let sep = if spec.is_empty() { "" } else { ", " };
    format!(
        "---\napiVersion: ferry.dev/v1alpha1\nkind: Subscription\nmetadata: {{name: {name}}}\nspec: {{topic: {topic}, group: {group}{sep}{spec}}}\n"
    )
}

/// One line of a pods file; `app` empty for a pod in no group.
pub fn pod(name: &str, zone: &str, app: &str) -> String {
    if app.is_empty() {
        format!("- {{name: {name}, zone: {zone}}}\n")
    } else {
        format!("- {{name: {name}, zone: {zone}, labels: {{app: {app}}}}}\n")
    }
}

/// How long a test lets its consumers run at most.
pub const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Waits until nothing is lost against `expect` (the drain), then prints and returns the
/// counts.
pub async fn drain(
    history: &History,
    expect: &[Expect],
    timeout: Duration,
    test: &str,
) -> anyhow::Result<Counts> {
    let result =
        ferry_sidecar_tests::harness::wait_for(timeout, "every acked message delivered", || {
            history.check(expect).lost == 0
        })
        .await;
    let counts = history.check(expect);
    println!("{test}: history {counts}");
    result.map(|()| counts)
}
