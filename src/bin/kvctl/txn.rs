//! `txn`: reads a transaction in etcdctl's format (compares, a blank line,
//! success requests, a blank line, failure requests) from standard input,
//! with prompts when interactive.
//!
//! ```text
//! mod("key1") > "0"
//!
//! put key1 "new value"
//!
//! get key1
//! ```

use std::io::{BufRead, Write};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser};
use kvd::client::Client;
use kvd::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use kvd::proto::etcdserverpb::request_op::Request;
use kvd::proto::etcdserverpb::{Compare, RequestOp, TxnRequest};

use crate::kv::{DelArgs, GetArgs, PutArgs};
use crate::output::{self, Format};

/// Arguments of `txn`.
#[derive(Args, Debug)]
pub struct TxnArgs {
    /// Prompt for each part of the transaction.
    #[arg(short, long)]
    pub interactive: bool,
}

#[derive(Parser)]
#[command(no_binary_name = true)]
enum OpCommand {
    Put(PutArgs),
    Get(GetArgs),
    Del(DelArgs),
}

/// Splits a line into arguments: words, "double-quoted" (with backslash
/// escapes) or 'single-quoted' strings.
pub fn split_args(line: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '"' => loop {
                    match chars.next() {
                        None => bail!("unterminated quote in {line:?}"),
                        Some('"') => break,
                        Some('\\') => {
                            word.push(unescape(chars.next().ok_or_else(|| anyhow!("dangling escape in {line:?}"))?))
                        }
                        Some(c) => word.push(c),
                    }
                },
                '\'' => loop {
                    match chars.next() {
                        None => bail!("unterminated quote in {line:?}"),
                        Some('\'') => break,
                        Some(c) => word.push(c),
                    }
                },
                c => word.push(c),
            }
        }
        out.push(word);
    }
    Ok(out)
}

fn unescape(c: char) -> char {
    match c {
        'n' => '\n',
        't' => '\t',
        'r' => '\r',
        '0' => '\0',
        other => other,
    }
}

/// Parses a compare line such as `mod("a") > "3"` or `value("k") = "v"`.
pub fn parse_compare(line: &str) -> Result<Compare> {
    let malformed = || anyhow!("malformed comparison: {line}");
    let (target, rest) = line.split_once('(').ok_or_else(malformed)?;
    let (key_part, rest) = rest.rsplit_once(')').ok_or_else(malformed)?;
    let key = split_args(key_part)?.into_iter().next().ok_or_else(malformed)?;
    let mut words = split_args(rest)?.into_iter();
    let op = words.next().ok_or_else(malformed)?;
    let value = words.next().ok_or_else(malformed)?;
    let result = match op.as_str() {
        "=" => CompareResult::Equal,
        "!=" => CompareResult::NotEqual,
        "<" => CompareResult::Less,
        ">" => CompareResult::Greater,
        _ => bail!("malformed comparison: {line} (unknown op {op})"),
    };
    let int = || value.parse::<i64>().map_err(|_| anyhow!("malformed comparison: {line} (invalid number {value:?})"));
    let (target, union) = match target.trim() {
        "ver" | "version" => (CompareTarget::Version, TargetUnion::Version(int()?)),
        "c" | "create" => (CompareTarget::Create, TargetUnion::CreateRevision(int()?)),
        "m" | "mod" => (CompareTarget::Mod, TargetUnion::ModRevision(int()?)),
        "val" | "value" => (CompareTarget::Value, TargetUnion::Value(value.clone().into_bytes())),
        "lease" => (CompareTarget::Lease, TargetUnion::Lease(i64::from_str_radix(&value, 16).or_else(|_| int())?)),
        t => bail!("malformed comparison: {line} (unknown target {t})"),
    };
    Ok(Compare {
        result: result as i32,
        target: target as i32,
        key: key.into_bytes(),
        target_union: Some(union),
        range_end: Vec::new(),
    })
}

/// Parses a request line: `put k v`, `get k [flags]` or `del k [flags]`.
pub fn parse_op(line: &str) -> Result<RequestOp> {
    let args = split_args(line)?;
    let cmd = OpCommand::try_parse_from(&args).map_err(|e| anyhow!("invalid txn request {line:?}: {}", e.kind()))?;
    let request = match cmd {
        OpCommand::Put(p) => {
            Request::RequestPut(p.request(|| Err(anyhow!("put command needs key and value: {line:?}")))?)
        }
        OpCommand::Get(g) => Request::RequestRange(g.request()?),
        OpCommand::Del(d) => Request::RequestDeleteRange(d.request()?),
    };
    Ok(RequestOp { request: Some(request) })
}

/// Reads the three sections of a transaction.
pub fn read_txn(input: &mut dyn BufRead, prompt: bool) -> Result<TxnRequest> {
    let mut section = |title: &str| -> Result<Vec<String>> {
        if prompt {
            outln!("{title}");
            std::io::stdout().flush()?;
        }
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if input.read_line(&mut line)? == 0 {
                break;
            }
            let line = line.trim();
            if line.is_empty() {
                break;
            }
            lines.push(line.to_string());
        }
        Ok(lines)
    };
    let compare = section("compares:")?.iter().map(|l| parse_compare(l)).collect::<Result<_>>()?;
    let success = section("success requests (get, put, del):")?.iter().map(|l| parse_op(l)).collect::<Result<_>>()?;
    let failure = section("failure requests (get, put, del):")?.iter().map(|l| parse_op(l)).collect::<Result<_>>()?;
    Ok(TxnRequest { compare, success, failure })
}

/// `txn`.
pub async fn run(client: &Client, args: TxnArgs, fmt: Format) -> Result<()> {
    let req = read_txn(&mut std::io::stdin().lock(), args.interactive)?;
    let resp = client.txn(req).await?;
    match fmt {
        Format::Json => output::print_json(&output::txn_json(&resp)),
        _ => output::print_txn(&resp),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_etcdctl_txn_format() {
        let text = "mod(\"a\") > \"0\"\nvalue(\"b\") = \"x y\"\n\nput a \"1 2\"\nget b --prefix\n\ndel c\n";
        let txn = read_txn(&mut text.as_bytes(), false).unwrap();
        assert_eq!(txn.compare.len(), 2);
        assert_eq!(txn.compare[1].target_union, Some(TargetUnion::Value(b"x y".to_vec())));
        assert_eq!(txn.success.len(), 2);
        match &txn.success[0].request {
            Some(Request::RequestPut(p)) => assert_eq!(p.value, b"1 2"),
            other => panic!("unexpected {other:?}"),
        }
        match &txn.success[1].request {
            Some(Request::RequestRange(r)) => assert_eq!(r.range_end, b"c"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(txn.failure.len(), 1);
    }

    #[test]
    fn rejects_malformed_compares() {
        assert!(parse_compare("mod(\"a\") >> \"0\"").is_err());
        assert!(parse_compare("bogus(\"a\") = \"0\"").is_err());
        assert!(parse_compare("mod(\"a\") = \"x\"").is_err());
    }
}
