//! TLS on the client port: etcdctl 3.4, kvctl and curl against a three-member
//! kvd with https:// client URLs, client certificates required or not; a
//! wrong CA, a missing client certificate and a plain-text client are
//! refused and the member serves everyone else. The same etcdctl commands
//! against etcd 3.4 set up the same way give the same outcomes.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::TestCluster;

/// A CA, a server and a client certificate signed by it, and a second CA
/// that signed nothing here, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, issuer) = ca("kvd test CA");
        write("ca.pem", ca_pem);
        write("other-ca.pem", ca("another CA").0);
        let loopback = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        // The same, valid only in 2020.
        for (name, sans, expired) in [
            ("server", loopback.clone(), false),
            ("client", vec![], false),
            ("expired-server", loopback, true),
            ("expired-client", vec![], true),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name.trim_start_matches("expired-"));
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 12, 31);
            }
            write(&format!("{name}.pem"), params.signed_by(&key, &issuer).unwrap().pem());
            write(&format!("{name}-key.pem"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// The flags that serve https:// with the PKI's server certificate.
/// With `client_cert_auth`, also the CA that client certificates must be
/// signed by.
fn server_flags(pki: &Pki, client_cert_auth: bool) -> Vec<String> {
    let mut flags =
        vec!["--cert-file".to_string(), pki.arg("server.pem"), "--key-file".into(), pki.arg("server-key.pem")];
    if client_cert_auth {
        flags.extend(["--trusted-ca-file".to_string(), pki.arg("ca.pem"), "--client-cert-auth".into()]);
    }
    flags
}

/// Runs a client program (`etcdctl` or kvctl) with `args`; whether it
/// succeeded, and what it said.
fn run(bin: &str, endpoint: &str, args: &[String]) -> (bool, String) {
    let out = Command::new(bin)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--dial-timeout", "2s", "--command-timeout", "4s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the client");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// What each TLS case gives a client: (case, succeeded, output).
fn outcomes(bin: &str, host_port: &str, pki: &Pki) -> Vec<(&'static str, bool, String)> {
    let https = format!("https://{host_port}");
    let ca = ["--cacert".to_string(), pki.arg("ca.pem")];
    let cert = ["--cert".to_string(), pki.arg("client.pem"), "--key".into(), pki.arg("client-key.pem")];
    let with = |parts: &[&[String]], cmd: &[&str]| -> Vec<String> {
        parts.iter().flat_map(|p| p.iter().cloned()).chain(cmd.iter().map(|s| s.to_string())).collect()
    };
    let other_ca = ["--cacert".to_string(), pki.arg("other-ca.pem")];
    let expired =
        ["--cert".to_string(), pki.arg("expired-client.pem"), "--key".into(), pki.arg("expired-client-key.pem")];
    let cases: Vec<(&'static str, String, Vec<String>)> = vec![
        ("put with CA and client cert", https.clone(), with(&[&ca, &cert], &["put", "tls-key", "v1"])),
        ("get with CA and client cert", https.clone(), with(&[&ca, &cert], &["get", "tls-key", "--print-value-only"])),
        ("get with CA, no client cert", https.clone(), with(&[&ca], &["get", "tls-key"])),
        ("get trusting another CA", https.clone(), with(&[&other_ca, &cert], &["get", "tls-key"])),
        ("get in plain text", format!("http://{host_port}"), vec!["get".into(), "tls-key".into()]),
        (
            "get again with CA and client cert",
            https.clone(),
            with(&[&ca, &cert], &["get", "tls-key", "--print-value-only"]),
        ),
        ("get with an expired client cert", https, with(&[&ca, &expired], &["get", "tls-key", "--print-value-only"])),
    ];
    cases
        .into_iter()
        .map(|(case, endpoint, args)| {
            let (ok, text) = run(bin, &endpoint, &args);
            (case, ok, text)
        })
        .collect()
}

fn https_cluster_args(args: &mut Vec<String>, flags: &[String]) {
    for i in 0..args.len() {
        if args[i] == "--listen-client-urls" || args[i] == "--advertise-client-urls" {
            args[i + 1] = args[i + 1].replace("http://", "https://");
        }
    }
    args.extend(flags.iter().cloned());
}

const KVCTL: &str = env!("CARGO_BIN_EXE_kvctl");

/// Makes a member's peer URLs (its own and those of --initial-cluster)
/// https://.
fn https_peers(args: &mut [String]) {
    for i in 0..args.len().saturating_sub(1) {
        if ["--listen-peer-urls", "--initial-advertise-peer-urls", "--initial-cluster"].contains(&args[i].as_str()) {
            args[i + 1] = args[i + 1].replace("http://", "https://");
        }
    }
}

/// What etcdctl and kvctl get in each case from a three-member kvd with
/// client TLS, and the client address they used.
type KvdOutcomes = (Vec<(&'static str, bool, String)>, Vec<(&'static str, bool, String)>, String);

async fn kvd_outcomes(client_cert_auth: bool) -> KvdOutcomes {
    let pki = Pki::new();
    let mut flags = server_flags(&pki, client_cert_auth);
    flags.extend(["--host-whitelist".to_string(), "localhost".into()]);
    let c = TestCluster::start(3, |args| https_cluster_args(args, &flags)).await;
    let endpoint = c.client_addrs[1].to_string();
    // /health, /metrics and the JSON gateway over TLS, in HTTP/2 (curl's
    // choice through ALPN) and in HTTP/1.1, which Patroni's and most HTTP
    // clients speak. The member takes only `localhost` as a plain-text
    // Host, which TLS requests are not held to.
    for (path, version, body, want) in [
        ("health", "--http2", "", r#"{"health":"true"}"#),
        ("health", "--http1.1", "", r#"{"health":"true"}"#),
        ("metrics", "--http1.1", "", "etcd_server_has_leader 1"),
        ("version", "--http1.1", "", r#"{"etcdserver":"3.4.0","etcdcluster":"3.4.0"}"#),
        ("v3/kv/put", "--http1.1", r#"{"key":"Z3c=","value":"aHR0cHM="}"#, r#""revision":"2""#),
        ("v3/kv/range", "--http2", r#"{"key":"Z3c="}"#, r#""value":"aHR0cHM=""#),
        ("v3/kv/range", "--http1.1", r#"{"key":"Z3c=","count_only":true}"#, r#""count":"1""#),
        ("v3/watch", "--http1.1", r#"{"create_request":{"key":"Z3c=","start_revision":"1"}}"#, r#""kv":{"key":"Z3c=""#),
    ] {
        let url = format!("https://{endpoint}/{path}");
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", if path == "v3/watch" { "2" } else { "10" }, version])
            .args(["-w", "\n%{http_version}", "-H", "Host: rebound.example"])
            .args(["--cacert", &pki.arg("ca.pem"), "--cert", &pki.arg("client.pem")])
            .args(["--key", &pki.arg("client-key.pem"), &url]);
        if !body.is_empty() {
            curl.args(["--data-binary", body]);
        }
        let got = String::from_utf8_lossy(&curl.output().expect("curl").stdout).to_string();
        let spoken = got.lines().last().unwrap_or_default().to_string();
        assert!(got.contains(want), "{path} over TLS with {version}: {got}");
        assert_eq!(spoken, version.trim_start_matches("--http"), "{path} with {version}: {got}");
    }
    let result = tokio::task::spawn_blocking(move || {
        let by_etcdctl = outcomes("etcdctl", &endpoint, &pki);
        let by_kvctl = outcomes(KVCTL, &endpoint, &pki);
        (by_etcdctl, by_kvctl, endpoint)
    })
    .await
    .unwrap();
    c.shutdown().await;
    result
}

/// Waits for the member at `endpoint` to log a failed handshake on its
/// `port` port that says `why`.
async fn handshake_logged(port: &str, endpoint: &str, why: &str) {
    let on = format!("TLS handshake on {port} port {endpoint} from 127.0.0.1:");
    support::logs().wait_for(&[&on, why]).await;
}

fn check(who: &str, got: &[(&'static str, bool, String)], want: &[bool]) {
    for ((case, ok, text), want) in got.iter().zip(want) {
        assert_eq!(ok, want, "{who}: {case}: {text}");
    }
    assert!(got[1].2.contains("v1") && got[5].2.contains("v1"), "{who}: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_tls_with_client_certificates_required() {
    support::logs();
    let (etcdctl, kvctl, endpoint) = kvd_outcomes(true).await;
    let want = [true, true, false, false, false, true, false];
    check("etcdctl against kvd", &etcdctl, &want);
    check("kvctl against kvd", &kvctl, &want);
    // kvctl says why, naming the endpoint.
    assert!(kvctl[3].2.contains("invalid peer certificate"), "{}", kvctl[3].2);
    // Plain text to a TLS port: an error naming the endpoint, with the hint
    // (what the connection did varies: the HTTP/2 client reads the server's
    // TLS alert as a bad frame, or finds the connection closed under it).
    let plain = &kvctl[4].2;
    assert!(plain.starts_with("Error: http://127.0.0.1:"), "{plain}");
    assert!(plain.contains("(the server may expect TLS: use an https:// endpoint)"), "{plain}");
    // The member said why it refused each of them.
    handshake_logged("client", &endpoint, "it presented no client certificate, and one is required").await;
    handshake_logged("client", &endpoint, "it refused this member's certificate").await;
    handshake_logged("client", &endpoint, "it does not speak TLS; a plain-text client?").await;
    handshake_logged("client", &endpoint, "its certificate was refused: certificate expired").await;
    // The same setup on etcd 3.4: the same outcomes.
    check("etcdctl against etcd 3.4", &etcd_outcomes(true).await, &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_tls_without_client_certificates() {
    let (etcdctl, kvctl, _) = kvd_outcomes(false).await;
    // Without a trusted CA no client certificate is asked for, so an
    // expired one is not looked at (etcd 3.4 does the same).
    let want = [true, true, true, false, false, true, true];
    check("etcdctl against kvd", &etcdctl, &want);
    check("kvctl against kvd", &kvctl, &want);
    check("etcdctl against etcd 3.4", &etcd_outcomes(false).await, &want);
}

/// The TLS cases run with etcdctl against etcd 3.4 set up as kvd is.
async fn etcd_outcomes(client_cert_auth: bool) -> Vec<(&'static str, bool, String)> {
    tokio::task::spawn_blocking(move || {
        let pki = Pki::new();
        let etcd = etcd_tls(&pki, client_cert_auth);
        outcomes("etcdctl", etcd.client.trim_start_matches("https://"), &pki)
    })
    .await
    .unwrap()
}

/// `kvd` refuses TLS flags that do not fit together, in one line.
#[test]
fn tls_flags_that_do_not_fit_are_refused() {
    let pki = Pki::new();
    let cases: [(&[&str], &str); 7] = [
        (&["--listen-client-urls", "https://127.0.0.1:1"], "https:// client URLs need --cert-file and --key-file"),
        (&["--peer-auto-tls"], "but the peer URLs are http://"),
        (
            &["--listen-peer-urls", "https://127.0.0.1:1", "--initial-advertise-peer-urls", "https://127.0.0.1:1"],
            "https:// peer URLs need --peer-cert-file and --peer-key-file (or --peer-auto-tls)",
        ),
        (&["--peer-auto-tls", "--peer-trusted-ca-file", "ca.pem"], "no --peer-trusted-ca-file can vouch for them"),
        (&["--cert-file", "x.pem"], "--cert-file and --key-file go together"),
        (&["--client-cert-auth"], "--client-cert-auth needs --trusted-ca-file"),
        (&["--listen-peer-urls", "https://127.0.0.1:1"], "must both be https:// or both http://"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_kvd")).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
    // A certificate file that is not one.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvd"))
        .args(["--data-dir", &dir.path().join("d").display().to_string()])
        .args(["--listen-client-urls", "https://127.0.0.1:0", "--advertise-client-urls", "https://127.0.0.1:2379"])
        .args(["--listen-peer-urls", "http://127.0.0.1:0"])
        .args(["--cert-file", &pki.arg("ca.pem"), "--key-file", &pki.arg("ca.pem")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no PEM private key"), "{err}");
}

/// A single-member etcd 3.4 serving clients over TLS with the PKI's server
/// certificate, once it answers.
fn etcd_tls(pki: &Pki, client_cert_auth: bool) -> support::Etcd {
    let etcd = support::Etcd::start_with("https", &server_flags(pki, client_cert_auth));
    let deadline = std::time::Instant::now() + support::WAIT;
    let args = ["--cacert".to_string(), pki.arg("ca.pem"), "--cert".into(), pki.arg("client.pem")]
        .into_iter()
        .chain(["--key".to_string(), pki.arg("client-key.pem"), "endpoint".into(), "health".into()])
        .collect::<Vec<_>>();
    while !run("etcdctl", &etcd.client, &args).0 {
        assert!(std::time::Instant::now() < deadline, "etcd did not become ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    etcd
}

/// `--auto-tls` serves https:// with a certificate made at start: etcdctl
/// reaches it when told not to verify it (etcdctl 3.4 needs
/// `--insecure-transport=false` for that), and not when it verifies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_tls_serves_a_self_signed_certificate() {
    let c = TestCluster::start(3, |args| https_cluster_args(args, &["--auto-tls".to_string()])).await;
    let endpoint = format!("https://{}", c.client_addrs[0]);
    tokio::task::spawn_blocking(move || {
        let skip = |cmd: &[&str]| -> Vec<String> {
            ["--insecure-transport=false", "--insecure-skip-tls-verify"]
                .into_iter()
                .chain(cmd.iter().copied())
                .map(String::from)
                .collect()
        };
        let (ok, text) = run("etcdctl", &endpoint, &skip(&["put", "auto", "tls"]));
        assert!(ok, "{text}");
        let (ok, text) = run("etcdctl", &endpoint, &skip(&["get", "auto", "--print-value-only"]));
        assert!(ok && text.contains("tls"), "{text}");
        let verify = ["--insecure-transport=false", "get", "auto"].map(String::from);
        let (ok, text) = run("etcdctl", &endpoint, &verify);
        assert!(!ok, "an unverified certificate was trusted: {text}");
        // kvctl: the same with etcdctl's flag, and a clear refusal without it.
        let (ok, text) = run(KVCTL, &endpoint, &["--insecure-skip-tls-verify", "get", "auto"].map(String::from));
        assert!(ok && text.contains("tls"), "{text}");
        let (ok, text) = run(KVCTL, &endpoint, &["put", "auto", "checked"].map(String::from));
        assert!(!ok && text.contains("invalid peer certificate: UnknownIssuer"), "{text}");
        let (ok, text) = run(KVCTL, &endpoint, &["--insecure-skip-tls-verify", "get", "auto"].map(String::from));
        assert!(ok && text.contains("tls"), "{text}");
    })
    .await
    .unwrap();
    c.shutdown().await;
}

/// TLS between members, with peer certificates required and only the
/// members' common name allowed: the cluster forms and takes writes; a peer
/// connection without a certificate, in plain text, or with a certificate
/// of another name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_tls_lets_only_members_in() {
    use kvd::proto::kvdpb::{peer_client::PeerClient, RaftPayload};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let pki = Pki::new();
    let flags = [
        "--peer-cert-file".to_string(),
        pki.arg("server.pem"),
        "--peer-key-file".into(),
        pki.arg("server-key.pem"),
        "--peer-trusted-ca-file".into(),
        pki.arg("ca.pem"),
        "--peer-client-cert-auth".into(),
        "--peer-cert-allowed-cn".into(),
        "server".into(),
    ];
    let c = TestCluster::start(3, |args| {
        https_peers(args);
        args.extend(flags.iter().cloned());
    })
    .await;
    let leader = c.wait_leader().await;
    for i in 0..3 {
        c.client(i).put(support::put(&format!("k{i}"), "v")).await.unwrap();
    }
    let addr = c.peer_addrs[(leader + 1) % 3];
    let ca = Certificate::from_pem(std::fs::read(pki.path("ca.pem")).unwrap());
    let read_index = |tls: Option<ClientTlsConfig>, scheme: &str| {
        let url = format!("{scheme}://{addr}");
        async move {
            let mut ep = Endpoint::from_shared(url).unwrap().connect_timeout(std::time::Duration::from_secs(2));
            if let Some(tls) = tls {
                ep = ep.tls_config(tls).unwrap();
            }
            let call = async {
                let channel = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
                PeerClient::new(channel)
                    .read_index(RaftPayload::default())
                    .await
                    .map(drop)
                    .map_err(|s| format!("{s:?}"))
            };
            // A connection the member neither serves nor closes is refused too.
            tokio::time::timeout(std::time::Duration::from_secs(10), call)
                .await
                .unwrap_or_else(|_| Err("no answer within 10 s".to_string()))
        }
    };
    let no_cert = read_index(Some(ClientTlsConfig::new().ca_certificate(ca.clone())), "https").await;
    assert!(no_cert.is_err(), "a peer connection without a certificate was served");
    let plain = read_index(None, "http").await;
    assert!(plain.is_err(), "a plain-text peer connection was served");
    let intruder = Identity::from_pem(
        std::fs::read(pki.path("client.pem")).unwrap(),
        std::fs::read(pki.path("client-key.pem")).unwrap(),
    );
    let other_name = read_index(Some(ClientTlsConfig::new().ca_certificate(ca).identity(intruder)), "https").await;
    let err = other_name.expect_err("a certificate of another name was served");
    assert!(err.contains("common name") && err.contains("client"), "{err}");
    // The members go on: one leader, every key, new writes.
    assert_eq!(c.wait_leader().await, leader);
    c.client(0).put(support::put("after", "v")).await.unwrap();
    let range =
        kvd::proto::etcdserverpb::RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    let client = c.client(2);
    assert_eq!(client.range(range).await.unwrap().kvs.len(), 3);
    c.shutdown().await;
}

/// `--peer-auto-tls`: members make their own certificates and reach each
/// other over TLS without checking them, as etcd's do; the cluster forms,
/// takes writes anywhere and serves them everywhere. A plain-text peer
/// connection is refused and logged; a TLS one without member identity
/// is refused by the identity check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_auto_tls_encrypts_between_members() {
    use kvd::proto::kvdpb::{peer_client::PeerClient, RaftPayload};
    support::logs();
    let c = TestCluster::start(3, |args| {
        https_peers(args);
        args.push("--peer-auto-tls".into());
    })
    .await;
    let leader = c.wait_leader().await;
    for i in 0..3 {
        c.client(i).put(support::put(&format!("k{i}"), "v")).await.unwrap();
    }
    let range =
        kvd::proto::etcdserverpb::RangeRequest { key: b"k".to_vec(), range_end: b"l".to_vec(), ..Default::default() };
    for i in 0..3 {
        assert_eq!(c.client(i).range(range.clone()).await.unwrap().kvs.len(), 3, "member {i}");
    }
    let addr = c.peer_addrs[(leader + 1) % 3];
    let ask = |channel: tonic::transport::Channel| async move {
        let mut peer = PeerClient::new(channel);
        let call = peer.read_index(RaftPayload::default());
        match tokio::time::timeout(std::time::Duration::from_secs(10), call).await {
            Ok(answer) => answer.map(drop).map_err(|s| format!("{s:?}")),
            Err(_) => Err("no answer within 10 s".to_string()),
        }
    };
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    assert!(ask(plain).await.is_err(), "a plain-text peer connection was served");
    handshake_logged("peer", &addr.to_string(), "it does not speak TLS").await;
    let unchecked = kvd::tls::client_config(kvd::tls::Trust::Anything, None).unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let stranger = ask(kvd::tls::channel(endpoint, unchecked, None)).await.expect_err("a stranger was served");
    assert!(stranger.contains("not from a kvd member"), "{stranger}");
    assert_eq!(c.wait_leader().await, leader);
    c.shutdown().await;
}

/// A member serving an expired certificate: etcdctl and kvctl refuse it and
/// say why; the same with etcd 3.4.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_server_certificate_is_refused_by_clients() {
    let pki = Pki::new();
    let flags = [
        "--cert-file".to_string(),
        pki.arg("expired-server.pem"),
        "--key-file".into(),
        pki.arg("expired-server-key.pem"),
    ];
    let c = TestCluster::start(1, |args| https_cluster_args(args, &flags)).await;
    let endpoint = format!("https://{}", c.client_addrs[0]);
    let etcd = support::Etcd::start_with("https", &flags);
    let etcd_endpoint = etcd.client.clone();
    tokio::task::spawn_blocking(move || {
        let ca = ["--cacert".to_string(), pki.arg("ca.pem"), "get".into(), "k".into()];
        let (ok, text) = run(KVCTL, &endpoint, &ca);
        assert!(!ok && text.contains("invalid peer certificate: certificate expired"), "kvctl: {text}");
        for (who, at) in [("kvd", &endpoint), ("etcd 3.4", &etcd_endpoint)] {
            let (ok, text) = run("etcdctl", at, &ca);
            assert!(!ok, "etcdctl against {who} trusted an expired certificate: {text}");
        }
    })
    .await
    .unwrap();
    drop(etcd);
    c.shutdown().await;
}

/// What a stranger gets from a peer port with peer certificates required:
/// (a TLS client without a certificate was served, plain text was served);
/// "served" means any HTTP answer with a 2xx status.
fn stranger_outcomes(pki: &Pki, peer: &str) -> (bool, bool) {
    let served = |args: &[&str]| -> bool {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "10", "-w", "%{http_code}"])
            .args(args)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).starts_with('2')
    };
    let no_cert = served(&["--cacert", &pki.arg("ca.pem"), &format!("https://{peer}/")]);
    let plain = served(&[&format!("http://{peer}/")]);
    (no_cert, plain)
}

/// Peer TLS with peer certificates required, the same flags on kvd and on
/// a three-member etcd 3.4: both clusters form and serve etcdctl, and both
/// peer ports refuse a client without a certificate and plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_tls_outcomes_match_etcd() {
    let pki = Pki::new();
    let flags: Vec<String> = [
        "--peer-cert-file",
        &pki.arg("server.pem"),
        "--peer-key-file",
        &pki.arg("server-key.pem"),
        "--peer-trusted-ca-file",
        &pki.arg("ca.pem"),
        "--peer-client-cert-auth",
        "--peer-cert-allowed-cn",
        "server",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // kvd.
    let c = TestCluster::start(3, |args| {
        https_peers(args);
        args.extend(flags.iter().cloned());
    })
    .await;
    let kvd_clients: Vec<String> = c.client_addrs.iter().map(|a| a.to_string()).collect();
    let kvd_peer = c.peer_addrs[1].to_string();
    // etcd 3.4, three members.
    let ports = kvd_testkit::free_ports(6);
    let dir = tempfile::tempdir().unwrap();
    let initial: Vec<String> = (0..3).map(|i| format!("e{i}=https://127.0.0.1:{}", ports[3 + i])).collect();
    let etcds: Vec<std::process::Child> = (0..3)
        .map(|i| {
            let client = format!("http://127.0.0.1:{}", ports[i]);
            let peer = format!("https://127.0.0.1:{}", ports[3 + i]);
            Command::new("etcd")
                .args(["--name", &format!("e{i}"), "--data-dir"])
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &initial.join(",")])
                .args(&flags)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd 3.4")
        })
        .collect();
    // Killed when the test ends, however it ends.
    struct Killed(Vec<std::process::Child>);
    impl Drop for Killed {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let etcds = Killed(etcds);
    let etcd_clients: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", ports[i])).collect();
    let etcd_peer = format!("127.0.0.1:{}", ports[4]);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut outcomes = Vec::new();
        for (who, clients, peer) in [("kvd", kvd_clients, kvd_peer), ("etcd 3.4", etcd_clients, etcd_peer)] {
            let all = clients.join(",");
            let deadline = std::time::Instant::now() + support::WAIT;
            while !run("etcdctl", &all, &["endpoint".into(), "health".into()]).0 {
                assert!(std::time::Instant::now() < deadline, "{who} did not become healthy");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let put = run("etcdctl", &clients[0], &["put".into(), "peer-tls".into(), "v".into()]).0;
            let get = run("etcdctl", &clients[2], &["get".into(), "peer-tls".into(), "--print-value-only".into()]);
            outcomes.push((who, put, get.0 && get.1.contains('v'), stranger_outcomes(&pki, &peer)));
        }
        outcomes
    })
    .await
    .unwrap();
    drop(etcds);
    c.shutdown().await;
    let (kvd, etcd) = (&outcome[0], &outcome[1]);
    assert_eq!((kvd.1, kvd.2, kvd.3), (true, true, (false, false)), "{kvd:?}");
    assert_eq!((etcd.1, etcd.2, etcd.3), (kvd.1, kvd.2, kvd.3), "{outcome:?}");
}

/// With auth on and client certificates required, a request without a
/// token is made as the user its certificate names (CN `client`), as in
/// etcd; with a token, as the token's user.
fn common_name_outcomes(endpoint: &str, pki: &Pki) -> Vec<(bool, String)> {
    let tls = ["--cacert".to_string(), pki.arg("ca.pem"), "--cert".into(), pki.arg("client.pem")]
        .into_iter()
        .chain(["--key".to_string(), pki.arg("client-key.pem")])
        .collect::<Vec<String>>();
    let steps: &[&[&str]] = &[
        &["user", "add", "root:rootpw"],
        &["user", "add", "client", "--no-password"],
        &["role", "add", "certs"],
        &["role", "grant-permission", "certs", "readwrite", "cn/", "--prefix"],
        &["user", "grant-role", "client", "certs"],
        &["auth", "enable"],
        &["put", "cn/1", "by-cert"],
        &["get", "cn/1", "--print-value-only"],
        &["put", "elsewhere", "x"],
        &["--user", "root:rootpw", "put", "elsewhere", "x"],
        &["--user", "client:anything", "get", "cn/1"],
        &["user", "list"],
    ];
    steps
        .iter()
        .map(|step| {
            let args: Vec<String> = tls.iter().cloned().chain(step.iter().map(|s| s.to_string())).collect();
            let (ok, text) = run("etcdctl", endpoint, &args);
            let text = text.lines().filter(|l| !l.contains("retry_interceptor")).collect::<Vec<_>>().join("\n");
            (ok, text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_names_the_user_as_in_etcd() {
    let pki = Pki::new();
    let mut flags = server_flags(&pki, true);
    flags.extend(["--bcrypt-cost".to_string(), "4".into()]);
    let c = TestCluster::start(1, |args| https_cluster_args(args, &flags)).await;
    let endpoint = format!("https://{}", c.client_addrs[0]);
    let (on_kvd, on_etcd) = tokio::task::spawn_blocking(move || {
        let on_kvd = common_name_outcomes(&endpoint, &pki);
        let etcd = etcd_tls(&pki, true);
        let on_etcd = common_name_outcomes(&etcd.client, &pki);
        (on_kvd, on_etcd)
    })
    .await
    .unwrap();
    assert_eq!(on_kvd, on_etcd);
    assert_eq!(on_kvd[7], (true, "by-cert".to_string()), "{on_kvd:?}");
    assert!(on_kvd[8].1.contains("etcdserver: permission denied"), "{on_kvd:?}");
    c.shutdown().await;
}
