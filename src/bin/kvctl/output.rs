//! Printing responses as etcdctl does: `simple` text, `json` (the response
//! messages with bytes in base64, zero fields left out), and `table` for the
//! cluster commands.

use base64::Engine;
use kvd::proto::etcdserverpb::{
    response_op, DeleteRangeResponse, PutResponse, RangeResponse, ResponseHeader, TxnResponse,
};
use kvd::proto::mvccpb::KeyValue;
use serde_json::{json, Map, Value};

/// How to print results.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable text.
    Simple,
    /// JSON, as etcdctl prints it.
    Json,
    /// A table (cluster commands; others print as simple).
    Table,
}

/// The text of an error as etcdctl shows it: the gRPC message alone.
pub fn error_text(e: &anyhow::Error, client: &kvd::client::Client) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => client.explain(s),
        None => e.to_string(),
    }
}

/// Bytes as a base64 JSON string.
pub fn b64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Builds a JSON object from fields, leaving out zero values like Go's
/// `omitempty`.
fn object(fields: Vec<(&str, Value)>) -> Value {
    let mut m = Map::new();
    for (k, v) in fields {
        let empty = match &v {
            Value::Null => true,
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_i64() == Some(0) || n.as_u64() == Some(0),
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(_) => false,
        };
        if !empty {
            m.insert(k.to_string(), v);
        }
    }
    Value::Object(m)
}

/// A response header as JSON.
pub fn header_json(h: &Option<ResponseHeader>) -> Value {
    let h = h.unwrap_or_default();
    object(vec![
        ("cluster_id", json!(h.cluster_id)),
        ("member_id", json!(h.member_id)),
        ("revision", json!(h.revision)),
        ("raft_term", json!(h.raft_term)),
    ])
}

/// A key-value as JSON.
pub fn kv_json(kv: &KeyValue) -> Value {
    object(vec![
        ("key", b64(&kv.key)),
        ("create_revision", json!(kv.create_revision)),
        ("mod_revision", json!(kv.mod_revision)),
        ("version", json!(kv.version)),
        ("value", b64(&kv.value)),
        ("lease", json!(kv.lease)),
    ])
}

fn with_header(h: &Option<ResponseHeader>, fields: Vec<(&str, Value)>) -> Value {
    let mut v = object(fields);
    if let Value::Object(m) = &mut v {
        let mut all = Map::new();
        all.insert("header".into(), header_json(h));
        all.extend(std::mem::take(m));
        *m = all;
    }
    v
}

/// A Range response as JSON.
pub fn range_json(r: &RangeResponse) -> Value {
    with_header(
        &r.header,
        vec![
            ("kvs", Value::Array(r.kvs.iter().map(kv_json).collect())),
            ("more", json!(r.more)),
            ("count", json!(r.count)),
        ],
    )
}

/// A Put response as JSON.
pub fn put_json(r: &PutResponse) -> Value {
    with_header(&r.header, vec![("prev_kv", r.prev_kv.as_ref().map(kv_json).unwrap_or(Value::Null))])
}

/// A DeleteRange response as JSON.
pub fn del_json(r: &DeleteRangeResponse) -> Value {
    with_header(
        &r.header,
        vec![("deleted", json!(r.deleted)), ("prev_kvs", Value::Array(r.prev_kvs.iter().map(kv_json).collect()))],
    )
}

/// A Txn response as JSON, with etcdctl's shape for the response union.
pub fn txn_json(r: &TxnResponse) -> Value {
    let responses = r
        .responses
        .iter()
        .map(|op| {
            let inner = match &op.response {
                Some(response_op::Response::ResponseRange(x)) => json!({ "ResponseRange": range_json(x) }),
                Some(response_op::Response::ResponsePut(x)) => json!({ "ResponsePut": put_json(x) }),
                Some(response_op::Response::ResponseDeleteRange(x)) => json!({ "ResponseDeleteRange": del_json(x) }),
                Some(response_op::Response::ResponseTxn(x)) => json!({ "ResponseTxn": txn_json(x) }),
                None => Value::Null,
            };
            json!({ "Response": inner })
        })
        .collect();
    with_header(&r.header, vec![("succeeded", json!(r.succeeded)), ("responses", Value::Array(responses))])
}

/// Prints a key-value as etcdctl's simple format does.
pub fn print_kv(kv: &KeyValue, value_only: bool) {
    if !value_only {
        outln!("{}", String::from_utf8_lossy(&kv.key));
    }
    outln!("{}", String::from_utf8_lossy(&kv.value));
}

/// Prints a Range response in simple format.
pub fn print_range(r: &RangeResponse, value_only: bool, count_only: bool) {
    if count_only {
        outln!("{}", r.count);
        return;
    }
    for kv in &r.kvs {
        print_kv(kv, value_only);
    }
}

/// Prints a Put response in simple format.
pub fn print_put(r: &PutResponse) {
    outln!("OK");
    if let Some(kv) = &r.prev_kv {
        print_kv(kv, false);
    }
}

/// Prints a DeleteRange response in simple format.
pub fn print_del(r: &DeleteRangeResponse) {
    outln!("{}", r.deleted);
    for kv in &r.prev_kvs {
        print_kv(kv, false);
    }
}

/// Prints a Txn response in simple format.
pub fn print_txn(r: &TxnResponse) {
    outln!("{}", if r.succeeded { "SUCCESS" } else { "FAILURE" });
    for op in &r.responses {
        outln!();
        match &op.response {
            Some(response_op::Response::ResponseRange(x)) => print_range(x, false, false),
            Some(response_op::Response::ResponsePut(x)) => print_put(x),
            Some(response_op::Response::ResponseDeleteRange(x)) => print_del(x),
            Some(response_op::Response::ResponseTxn(x)) => print_txn(x),
            None => {}
        }
    }
}

/// Prints JSON on one line.
pub fn print_json(v: &Value) {
    outln!("{v}");
}

/// Prints rows as an ASCII table with a header row.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let rule: String = widths.iter().map(|w| format!("+{}", "-".repeat(w + 2))).collect::<String>() + "+";
    let line = |cells: Vec<&str>| -> String {
        cells.iter().zip(&widths).map(|(c, w)| format!("| {c:^w$} ")).collect::<String>() + "|"
    };
    outln!("{rule}");
    outln!("{}", line(header.to_vec()));
    outln!("{rule}");
    for row in rows {
        outln!("{}", line(row.iter().map(String::as_str).collect()));
    }
    outln!("{rule}");
}

/// Bytes in the units etcdctl uses (kB, MB, ...).
pub fn human_bytes(n: i64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
