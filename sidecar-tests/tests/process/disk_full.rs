//! docs/reliability.md row 9: the producer's data dir runs out of space under load. Its data dir
//! is a loop-mounted 40 MiB ext4 (root only, like the network-namespace suite), with an
//! 8 MiB filler file that the test deletes to free space again.
//!
//! Publishes that cannot be made durable fail with RESOURCE_EXHAUSTED naming the full
//! device, and none of them is acked; after the filler is deleted, publishing resumes; a
//! consumer then receives every acked message: lost = 0.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use ferry_sidecar_tests::history::History;

use super::common::{ledger_mesh, read_back_ledger};
use super::durable_app::publish_with;

const IMAGE_MIB: u64 = 40;
const FILLER_MIB: usize = 8;
/// 16 KiB messages: the disk fills after about two thousand.
const PAYLOAD: usize = 16 << 10;

/// A small ext4 mounted on a directory; unmounted (lazily) on drop, whatever happened.
struct LoopDisk {
    mount: PathBuf,
    image: PathBuf,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl LoopDisk {
    fn mount_on(mount: &Path) -> anyhow::Result<Self> {
        if !is_root() {
            bail!("the disk-full test mounts a loop device: run it as root (./test.sh in CI is)");
        }
        let image = mount.with_extension("img");
        let file = std::fs::File::create(&image)?;
        file.set_len(IMAGE_MIB << 20)?;
        drop(file);
        let image_arg = image.to_string_lossy().into_owned();
        run("mkfs.ext4", &["-q", "-F", &image_arg])?;
        std::fs::create_dir_all(mount)?;
        run(
            "mount",
            &["-o", "loop", &image_arg, &mount.to_string_lossy()],
        )?;
        Ok(Self {
            mount: mount.to_path_buf(),
            image,
        })
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", &self.mount.to_string_lossy()])
            .status();
        let _ = std::fs::remove_file(&self.image);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_full_refuses_then_resumes_and_loses_nothing() -> anyhow::Result<()> {
    let mut mesh = ledger_mesh().await?;
    // The producer restarts on an empty data dir that is a small disk of its own.
    mesh.mesh.kill9("producer").await?;
    let data_dir = mesh.mesh.spec("producer")?.data_dir.clone();
    let disk = LoopDisk::mount_on(&data_dir)?;
    let filler = disk.mount.join("filler");
    std::fs::write(&filler, vec![0u8; FILLER_MIB << 20])?;
    mesh.mesh.restart("producer").await?;

    let history = History::default();
    let ledger = "default/ledger";
    let mut app = mesh.app("producer").await?;
    let payload = vec![b'x'; PAYLOAD];
    let (mut acked, mut refused) = (0u64, Vec::new());
    for i in 0..4000 {
        let r = publish_with(&mut app, &history, ledger, &format!("full-{i}"), |r| {
            r.payload = payload.clone().into();
        })
        .await;
        match r {
            Ok(_) => acked += 1,
            Err(status) => {
                refused.push(status);
                if refused.len() >= 20 {
                    break;
                }
            }
        }
    }
    println!(
        "disk_full: {acked} acked before the disk filled, {} refused",
        refused.len()
    );
    ensure!(!refused.is_empty(), "the 40 MiB disk never filled");
    for status in &refused {
        ensure!(
            status.code() == tonic::Code::ResourceExhausted
                && status.message().contains("No space left on device"),
            "a publish on a full disk must be RESOURCE_EXHAUSTED naming the device: {status:?}"
        );
    }

    // Space again: publishing resumes.
    std::fs::remove_file(&filler)?;
    let mut resumed = 0;
    for i in 0..20 {
        let sent = publish_with(&mut app, &history, ledger, &format!("after-{i}"), |r| {
            r.payload = b"small".to_vec().into();
        })
        .await;
        resumed += u32::from(sent.is_ok());
    }
    ensure!(
        resumed == 20,
        "after space was freed only {resumed}/20 publishes went through"
    );

    // Everything acked is delivered.
    let counts = read_back_ledger(&mesh, &history, "disk_full").await?;
    ensure!(
        (counts.lost, counts.unexpected) == (0, 0),
        "lost or unexpected messages: {counts}"
    );
    mesh.mesh.shutdown().await;
    drop(disk);
    Ok(())
}
