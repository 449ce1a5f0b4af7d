//! Running a [`ContainerPlan`]: the pod's volumes as folders ([`Sandbox`]), and the
//! container's process ([`container_command`]) in the pod's network namespace, with the
//! volumes bind-mounted at their `mountPath` in a mount namespace of its own and no
//! environment but the container's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use kube::Client;
use tokio::task::JoinHandle;

use super::{ContainerPlan, Volume, tokens};

/// What a container image gives every process: a standard `PATH`.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mounts each `SOURCE TARGET MODE` triple up to `--` (creating the mount point, as a
/// container runtime does in the image's root), then runs the rest. Arguments are
/// positional, so no path is ever parsed by the shell; the shell's own `PWD` is not passed
/// on.
const MOUNT_SCRIPT: &str = r#"set -e
unset PWD OLDPWD
while [ "$1" != -- ]; do
  mkdir -p "$2"
  mount --bind "$1" "$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$2"; fi
  shift 3
done
shift
exec "$@""#;

/// The pod's volumes on the host: one folder each under the pod's folder, for the pod's
/// lifetime (a restarted container finds them as it left them). Projected tokens are
/// refreshed in the background until it is dropped.
#[derive(Debug)]
pub struct Sandbox {
    dirs: BTreeMap<String, PathBuf>,
    projected: Vec<String>,
    refreshers: Vec<JoinHandle<()>>,
}

impl Sandbox {
    /// Makes the volumes of `plan` under `dir`, requesting its projected tokens.
    pub async fn prepare(client: &Client, plan: &ContainerPlan, dir: &Path) -> Result<Self> {
        let mut sandbox = Self {
            dirs: BTreeMap::new(),
            projected: Vec::new(),
            refreshers: Vec::new(),
        };
        for (name, volume) in &plan.volumes {
            let path = dir.join("volumes").join(name);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            if let Volume::Projected { mode, tokens } = volume {
                sandbox.projected.push(name.clone());
                for source in tokens {
                    let file = path.join(&source.path);
                    let (token, lifetime) = tokens::request(client, plan, source).await?;
                    tokens::write(&file, &token, *mode)?;
                    sandbox.refreshers.push(tokio::spawn(tokens::keep_fresh(
                        client.clone(),
                        plan.clone(),
                        source.clone(),
                        file,
                        *mode,
                        lifetime,
                    )));
                }
            }
            sandbox.dirs.insert(name.clone(), path);
        }
        Ok(sandbox)
    }

    /// The host folder of volume `name`.
    pub fn volume_dir(&self, name: &str) -> Option<&Path> {
        self.dirs.get(name).map(PathBuf::as_path)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for refresher in &self.refreshers {
            refresher.abort();
        }
    }
}

/// The command that runs `plan`'s container in network namespace `netns`, killed if the
/// test process dies (`setpriv --pdeathsig`: every step `exec`s, so the container's
/// process is the spawned child itself).
pub fn container_command(
    plan: &ContainerPlan,
    sandbox: &Sandbox,
    netns: &str,
) -> Result<tokio::process::Command> {
    let mut command = tokio::process::Command::new("ip");
    command.args(["netns", "exec", netns]);
    command.args(["unshare", "--mount", "--propagation", "private", "--"]);
    command.args(["sh", "-c", MOUNT_SCRIPT, "sh"]);
    for mount in &plan.mounts {
        let source = sandbox
            .volume_dir(&mount.volume)
            .with_context(|| format!("volume {} was not prepared", mount.volume))?;
        // The kubelet mounts projected volumes read-only whatever the mount says.
        let read_only = mount.read_only || sandbox.projected.contains(&mount.volume);
        command.arg(source).arg(&mount.path);
        command.arg(if read_only { "ro" } else { "rw" });
    }
    command.args(["--", "setpriv", "--pdeathsig", "KILL", "--"]);
    command.arg(&plan.program).args(&plan.args);
    command
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .env("HOSTNAME", &plan.pod)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        // The image's working directory (none is set, so its root).
        .current_dir("/")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    Ok(command)
}
