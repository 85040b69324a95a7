//! `kvctl snapshot save|status|restore`, as etcdctl's: save a copy of one
//! member's data to a file, describe a file, and make a new member's data
//! directory of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use kvd::backup;
use kvd::client::Client;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Stores a snapshot of one member's data in a file.
    Save(SaveArgs),
    /// Checks a snapshot file and shows its hash, revision, keys and size.
    Status(FileArgs),
    /// Makes a new member's data directory from a snapshot file.
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct SaveArgs {
    /// The file to write.
    pub filename: PathBuf,
}

#[derive(Args)]
pub struct FileArgs {
    /// The snapshot file.
    pub filename: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot file.
    pub filename: PathBuf,
    /// The data directory to make; it must not exist, or be empty. Restore
    /// every member of the new cluster from the same file, then start each
    /// on its directory with `--initial-cluster-state new`.
    #[arg(long)]
    pub data_dir: PathBuf,
}

/// Whether the command works on local files only.
pub fn is_local(cmd: &SnapshotCommand) -> bool {
    !matches!(cmd, SnapshotCommand::Save(_))
}

pub async fn run(client: &Client, cmd: SnapshotCommand, fmt: Format) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Save(a) => save(client, &a.filename).await,
        SnapshotCommand::Status(a) => {
            let s = backup::status(&a.filename)?;
            print_summary(&s, fmt);
            Ok(())
        }
        SnapshotCommand::Restore(a) => {
            let s = backup::restore(&a.filename, &a.data_dir)?;
            outln!("Restored snapshot at revision {} ({} keys) into {}", s.revision, s.keys, a.data_dir.display());
            Ok(())
        }
    }
}

fn print_summary(s: &backup::Summary, fmt: Format) {
    match fmt {
        Format::Simple => {
            outln!("{:x}, {}, {}, {}", s.hash, s.revision, s.keys, output::human_bytes(s.size as i64))
        }
        Format::Json => output::print_json(
            &json!({"hash": s.hash, "revision": s.revision, "totalKey": s.keys, "totalSize": s.size}),
        ),
        Format::Table => output::print_table(
            &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
            &[vec![
                format!("{:x}", s.hash),
                s.revision.to_string(),
                s.keys.to_string(),
                output::human_bytes(s.size as i64),
            ]],
        ),
    }
}

/// Receives the snapshot stream into `<file>.part`, checks the digest that
/// ends it, syncs the file and renames it into place: `file` appears only
/// whole and checked.
async fn save(client: &Client, file: &Path) -> anyhow::Result<()> {
    if client.endpoints().len() != 1 {
        bail!("snapshot must be requested to one selected node, not multiple {:?}", client.endpoints());
    }
    let part = PathBuf::from(format!("{}.part", file.display()));
    let result = receive(client, &part, file).await;
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, file).with_context(|| format!("cannot rename {} to {}", part.display(), file.display()))?;
    outln!("Snapshot saved at {}", file.display());
    Ok(())
}

/// Receives the snapshot into `part`, to become `file`.
async fn receive(client: &Client, part: &Path, file: &Path) -> anyhow::Result<()> {
    let mut out = std::fs::File::create(part).with_context(|| format!("cannot create {}", part.display()))?;
    let mut stream = client.snapshot_of(0).await?;
    let mut hasher = Sha256::new();
    let (mut data_done, mut digest) = (false, None);
    let mut received = 0u64;
    let endpoint = client.endpoints().first().cloned().unwrap_or_default();
    let broke = |e: tonic::Status, received: u64| {
        anyhow!(
            "the snapshot stream from {endpoint} broke after {received} bytes ({}); {} was not written",
            e.message(),
            file.display()
        )
    };
    // A refusal before any data is the server's answer, which the caller
    // explains as it explains any other.
    while let Some(msg) = stream.message().await.map_err(|e| match received {
        0 => anyhow::Error::from(e),
        _ => broke(e, received),
    })? {
        received += msg.blob.len() as u64;
        if digest.is_some() {
            bail!("the snapshot stream went on after its digest");
        }
        if data_done {
            digest = Some(msg.blob);
            continue;
        }
        hasher.update(&msg.blob);
        out.write_all(&msg.blob)?;
        data_done = msg.remaining_bytes == 0;
    }
    let digest = digest.ok_or_else(|| anyhow!("the snapshot stream ended before its digest"))?;
    if hasher.finalize()[..] != digest[..] {
        bail!("the snapshot's SHA-256 digest does not match its data");
    }
    out.write_all(&digest)?;
    out.sync_all()?;
    Ok(())
}
