//! Apps of an [`E2e`] world: `ferry-e2e-app` processes next to their pod's sidecar, and
//! the events they recorded.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tokio::process::Child;

use super::{CONVERGE, E2e};
use crate::app_events::{AppEvent, read_events, read_merged};
use crate::wait_for_value;

/// A running `ferry-e2e-app`; killed when dropped.
#[derive(Debug)]
pub struct AppProcess {
    pub pod: String,
    pub history: PathBuf,
    child: Child,
}

impl AppProcess {
    /// Its history so far.
    pub fn events(&self) -> Result<Vec<AppEvent>> {
        Ok(read_events(&self.history)?)
    }

    /// Waits until its history has an event that satisfies `check`.
    pub async fn wait_event(&self, what: &str, check: impl Fn(&AppEvent) -> bool) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            Ok(self.events()?.iter().any(&check).then_some(()))
        })
        .await
        .with_context(|| format!("app on {}: {what}", self.pod))
    }

    /// Waits for a publisher's `done`.
    pub async fn wait_done(&self) -> Result<()> {
        self.wait_event("publishes everything", |e| {
            matches!(e, AppEvent::Done { .. })
        })
        .await
    }

    /// Waits for a consumer's `subscribed`.
    pub async fn wait_subscribed(&self) -> Result<()> {
        self.wait_event("subscribes", |e| matches!(e, AppEvent::Subscribed { .. }))
            .await
    }

    /// Kills it (`SIGKILL`) and reaps it.
    pub async fn kill(mut self) -> Result<()> {
        self.child.start_kill().ok();
        self.child.wait().await?;
        Ok(())
    }
}

impl E2e {
    /// Starts `ferry-e2e-app ARGS` in the pod's namespace, history in a new file.
    pub async fn app(&mut self, pod: &str, args: &[&str]) -> Result<AppProcess> {
        self.next_app += 1;
        let history = self
            .dir
            .path()
            .join(format!("app-{}-{pod}.jsonl", self.next_app));
        let log = std::fs::File::create(history.with_extension("log"))?;
        let net = self.pod(pod)?.net.clone();
        let child = self
            .fabric
            .command(&net, &self.bins.app)
            .arg("--history")
            .arg(&history)
            .args(["--pod", pod])
            .args(args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting ferry-e2e-app on {pod}"))?;
        self.apps.push(history.clone());
        Ok(AppProcess {
            pod: pod.to_owned(),
            history,
            child,
        })
    }

    /// A consumer app: `consume --subscription <ns>/<sub> --group <group>`, waited on
    /// until it is subscribed.
    pub async fn consumer(
        &mut self,
        pod: &str,
        subscription: &str,
        group: &str,
    ) -> Result<AppProcess> {
        let sub = format!("{}/{subscription}", self.ns);
        let app = self
            .app(pod, &["consume", "--subscription", &sub, "--group", group])
            .await?;
        app.wait_subscribed().await?;
        Ok(app)
    }

    /// A publisher app: `count` messages `<prefix>-<i>` to `<ns>/<topic>` (plus `extra`
    /// arguments), waited on until it is done.
    pub async fn publish(
        &mut self,
        pod: &str,
        topic: &str,
        prefix: &str,
        count: u64,
        extra: &[&str],
    ) -> Result<AppProcess> {
        let topic = format!("{}/{topic}", self.ns);
        let count = count.to_string();
        let mut args = vec![
            "publish", "--topic", &topic, "--prefix", prefix, "--count", &count,
        ];
        args.extend_from_slice(extra);
        let app = self.app(pod, &args).await?;
        app.wait_done().await?;
        Ok(app)
    }

    /// Every history line of every app of this world, in the order they happened.
    pub fn events(&self) -> Result<Vec<AppEvent>> {
        Ok(read_merged(&self.apps)?)
    }

    /// Waits until `check` holds for the current events.
    pub async fn wait_events(&self, what: &str, check: impl Fn(&[AppEvent]) -> bool) -> Result<()> {
        wait_for_value(CONVERGE, || async {
            Ok(check(&self.events()?).then_some(()))
        })
        .await
        .with_context(|| what.to_owned())
    }
}
