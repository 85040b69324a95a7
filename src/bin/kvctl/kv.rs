//! `put`, `get`, `del` and `compaction`.

use std::io::Read;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kvd::client::Client;
use kvd::mvcc::keys::prefix_end;
use kvd::proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use kvd::proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest};

use crate::output::{self, Format};

/// Arguments of `put`.
#[derive(Args, Debug)]
pub struct PutArgs {
    /// The key.
    pub key: String,
    /// The value; read from standard input when left out.
    pub value: Option<String>,
    /// Lease ID (in hexadecimal) to attach to the key.
    #[arg(long, default_value = "0")]
    pub lease: String,
    /// Return the previous key-value pair before modification.
    #[arg(long)]
    pub prev_kv: bool,
    /// Update the key using its current value.
    #[arg(long)]
    pub ignore_value: bool,
    /// Update the key using its current lease.
    #[arg(long)]
    pub ignore_lease: bool,
}

impl PutArgs {
    /// The request these arguments describe.
    pub fn request(&self, stdin_value: impl FnOnce() -> Result<String>) -> Result<PutRequest> {
        let value = match (&self.value, self.ignore_value) {
            (Some(v), _) => v.clone(),
            (None, true) => String::new(),
            (None, false) => stdin_value()?,
        };
        let lease = i64::from_str_radix(self.lease.trim_start_matches("0x"), 16)
            .with_context(|| format!("bad lease ID ({:?}), expecting ID in Hex", self.lease))?;
        Ok(PutRequest {
            key: self.key.clone().into_bytes(),
            value: value.into_bytes(),
            lease,
            prev_kv: self.prev_kv,
            ignore_value: self.ignore_value,
            ignore_lease: self.ignore_lease,
        })
    }
}

/// `put`.
pub async fn put(client: &Client, args: PutArgs, fmt: Format) -> Result<()> {
    let req = args.request(|| {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    })?;
    let resp = client.put(req).await?;
    match fmt {
        Format::Json => output::print_json(&output::put_json(&resp)),
        _ => output::print_put(&resp),
    }
    Ok(())
}

/// Sort orders, as etcdctl names them.
#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum Order {
    /// Lowest first.
    Ascend,
    /// Highest first.
    Descend,
}

/// Sort targets, as etcdctl names them.
#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "UPPER")]
pub enum SortBy {
    /// By creation revision.
    Create,
    /// By key.
    Key,
    /// By modification revision.
    Modify,
    /// By value.
    Value,
    /// By version.
    Version,
}

/// Arguments of `get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// The key, or the start of the range.
    pub key: String,
    /// The end of the range [key, range_end).
    pub range_end: Option<String>,
    /// Get keys with matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Get keys that are greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
    /// Maximum number of results.
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Revision to read at (0 for the newest).
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Order of results.
    #[arg(long, value_enum)]
    pub order: Option<Order>,
    /// Sort target.
    #[arg(long, value_enum)]
    pub sort_by: Option<SortBy>,
    /// Get only the keys.
    #[arg(long)]
    pub keys_only: bool,
    /// Get only the count.
    #[arg(long)]
    pub count_only: bool,
    /// Only print the values.
    #[arg(long)]
    pub print_value_only: bool,
    /// Linearizable (l) or serializable (s).
    #[arg(long, default_value = "l")]
    pub consistency: String,
}

/// The key and range end of `key [range_end]` with `--prefix` or
/// `--from-key`, as etcdctl builds them.
pub fn key_range(key: &str, range_end: &Option<String>, prefix: bool, from_key: bool) -> Result<(Vec<u8>, Vec<u8>)> {
    if prefix && from_key {
        bail!("`--prefix` and `--from-key` cannot be set at the same time, choose one");
    }
    if range_end.is_some() && (prefix || from_key) {
        bail!("too many arguments, only accept one argument when `--prefix` or `--from-key` is set");
    }
    let mut k = key.as_bytes().to_vec();
    let end = if let Some(e) = range_end {
        e.as_bytes().to_vec()
    } else if prefix {
        if k.is_empty() {
            k = vec![0];
            vec![0]
        } else {
            prefix_end(&k)
        }
    } else if from_key {
        if k.is_empty() {
            k = vec![0];
        }
        vec![0]
    } else {
        Vec::new()
    };
    Ok((k, end))
}

impl GetArgs {
    /// The request these arguments describe.
    pub fn request(&self) -> Result<RangeRequest> {
        let (key, range_end) = key_range(&self.key, &self.range_end, self.prefix, self.from_key)?;
        let serializable = match self.consistency.as_str() {
            "l" => false,
            "s" => true,
            other => bail!("unknown consistency flag {other:?}"),
        };
        let target = match self.sort_by {
            None | Some(SortBy::Key) => SortTarget::Key,
            Some(SortBy::Create) => SortTarget::Create,
            Some(SortBy::Modify) => SortTarget::Mod,
            Some(SortBy::Value) => SortTarget::Value,
            Some(SortBy::Version) => SortTarget::Version,
        };
        let mut order = match self.order {
            None => SortOrder::None,
            Some(Order::Ascend) => SortOrder::Ascend,
            Some(Order::Descend) => SortOrder::Descend,
        };
        // Keys come sorted ascending already, as etcd's client knows.
        if target == SortTarget::Key && order == SortOrder::Ascend {
            order = SortOrder::None;
        }
        Ok(RangeRequest {
            key,
            range_end,
            limit: self.limit,
            revision: self.rev,
            sort_order: order as i32,
            sort_target: target as i32,
            serializable,
            keys_only: self.keys_only,
            count_only: self.count_only,
            ..Default::default()
        })
    }
}

/// `get`.
pub async fn get(client: &Client, args: GetArgs, fmt: Format) -> Result<()> {
    let resp = client.range(args.request()?).await?;
    match fmt {
        Format::Json => output::print_json(&output::range_json(&resp)),
        _ => output::print_range(&resp, args.print_value_only, args.count_only),
    }
    Ok(())
}

/// Arguments of `del`.
#[derive(Args, Debug)]
pub struct DelArgs {
    /// The key, or the start of the range.
    pub key: String,
    /// The end of the range [key, range_end).
    pub range_end: Option<String>,
    /// Delete keys with matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Delete keys that are greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
    /// Return the deleted key-value pairs.
    #[arg(long)]
    pub prev_kv: bool,
}

impl DelArgs {
    /// The request these arguments describe.
    pub fn request(&self) -> Result<DeleteRangeRequest> {
        let (key, range_end) = key_range(&self.key, &self.range_end, self.prefix, self.from_key)?;
        Ok(DeleteRangeRequest { key, range_end, prev_kv: self.prev_kv })
    }
}

/// `del`.
pub async fn del(client: &Client, args: DelArgs, fmt: Format) -> Result<()> {
    let resp = client.delete_range(args.request()?).await?;
    match fmt {
        Format::Json => output::print_json(&output::del_json(&resp)),
        _ => output::print_del(&resp),
    }
    Ok(())
}

/// Arguments of `compaction`.
#[derive(Args, Debug)]
pub struct CompactionArgs {
    /// The revision to compact up to.
    pub revision: i64,
    /// Wait until the compaction is physically applied.
    #[arg(long)]
    pub physical: bool,
}

/// `compaction`.
pub async fn compaction(client: &Client, args: CompactionArgs, fmt: Format) -> Result<()> {
    let resp = client.compact(CompactionRequest { revision: args.revision, physical: args.physical }).await?;
    match fmt {
        Format::Json => output::print_json(&serde_json::json!({ "header": output::header_json(&resp.header) })),
        _ => outln!("compacted revision {}", args.revision),
    }
    Ok(())
}
