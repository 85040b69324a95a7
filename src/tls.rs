//! TLS on the client and peer ports, with etcd's flags, done by rustls
//! directly (tonic only sees the decrypted streams).
//!
//! Client port: `--cert-file`/`--key-file` or `--auto-tls` (a self-signed
//! certificate made at start), and `--trusted-ca-file` (with or without
//! `--client-cert-auth`, as in etcd 3.4), which then requires client
//! certificates it signed. Peer port: `--peer-cert-file`/`--peer-key-file`
//! or `--peer-auto-tls` on https:// peer URLs, presented both ways,
//! `--peer-trusted-ca-file` for the other members' certificates, and
//! `--peer-cert-allowed-cn`, which `grpc::peer` checks.
//!
//! Owning the handshake lets a member log why one failed (tonic drops that
//! silently), lets clients skip verification where the operator asks for it
//! (`kvctl --insecure-skip-tls-verify`, and members under `--peer-auto-tls`,
//! as etcd's do), and lets HTTP/1.1 clients reach `/health` and `/metrics`
//! over TLS through ALPN.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one failed-handshake line per port in this long; the next line
/// says how many were left out.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file could not be read.
    #[error("cannot read --{flag} {path}: {why}")]
    Read {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: String,
        /// The cause.
        why: String,
    },
    /// A file holds no PEM data of the kind it must.
    #[error("--{flag} {path} holds no PEM {what}")]
    NotPem {
        /// The flag that named it.
        flag: &'static str,
        /// The file.
        path: String,
        /// What it should hold.
        what: &'static str,
    },
    /// rustls refused a certificate, key or CA.
    #[error("{what}: {why}")]
    Refused {
        /// What was being set up.
        what: String,
        /// rustls' reason.
        why: String,
    },
    /// A self-signed certificate could not be made.
    #[error("--{flag}: cannot make a certificate: {why}")]
    AutoTls {
        /// `auto-tls` or `peer-auto-tls`.
        flag: &'static str,
        /// The cause.
        why: String,
    },
}

/// A certificate chain and its private key.
pub struct KeyPair {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for KeyPair {
    fn clone(&self) -> Self {
        KeyPair { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl KeyPair {
    /// A certificate chain and key from PEM files; `cert_flag` and
    /// `key_flag` name the flags that gave them, for errors.
    pub fn from_files(
        cert_flag: &'static str,
        cert: &Path,
        key_flag: &'static str,
        key: &Path,
    ) -> Result<Self, TlsError> {
        let chain = certificates(cert_flag, &cert.display().to_string(), &read(cert_flag, cert)?)?;
        let key = PrivateKeyDer::from_pem_slice(&read(key_flag, key)?).map_err(|_| TlsError::NotPem {
            flag: key_flag,
            path: key.display().to_string(),
            what: "private key",
        })?;
        Ok(KeyPair { chain, key })
    }

    /// A self-signed certificate for `hosts`, as `--auto-tls` makes.
    fn self_signed(flag: &'static str, hosts: &[String]) -> Result<KeyPair, TlsError> {
        let made = rcgen::generate_simple_self_signed(hosts.to_vec())
            .map_err(|e| TlsError::AutoTls { flag, why: e.to_string() })?;
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| TlsError::AutoTls { flag, why: e.to_string() })?;
        Ok(KeyPair { chain: vec![made.cert.der().clone()], key })
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { flag, path: path.display().to_string(), why: e.to_string() })
}

/// The certificates in PEM bytes; at least one.
fn certificates(flag: &'static str, path: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NotPem { flag, path: path.to_string(), what: "certificate" });
    }
    Ok(certs)
}

/// A root store of the CA certificates in PEM bytes.
fn roots(flag: &'static str, path: &str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(flag, path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Refused { what: format!("--{flag} {path}"), why: e.to_string() })?;
    }
    Ok(roots)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS side of one listening port: it makes the handshakes and logs
/// the ones that fail.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    port: &'static str,
    failures: Arc<FailureLog>,
}

impl ServerTls {
    fn new(
        port: &'static str,
        pair: KeyPair,
        client_ca: Option<RootCertStore>,
        alpn: &[&[u8]],
    ) -> Result<Self, TlsError> {
        let refused = |why: String| TlsError::Refused { what: format!("{port} port TLS"), why };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| refused(e.to_string()))?;
        let builder = match client_ca {
            Some(roots) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| refused(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(pair.chain, pair.key).map_err(|e| refused(e.to_string()))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            port,
            failures: Arc::new(FailureLog::default()),
        })
    }

    /// The connections accepted on `listener` that completed a handshake.
    /// Handshakes run side by side, so a slow or silent client holds up no
    /// one else; failures are logged. Accepting stops when the stream is
    /// dropped.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl tokio_stream::Stream<Item = io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        let local = listener.local_addr().ok();
        tokio::spawn(async move {
            loop {
                let (tcp, from) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: wait a
                            // little rather than spin.
                            tracing::warn!("{} port: accept: {e}", tls.port);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
                }
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => tls.failures.note(tls.port, local, from, server_side_reason(&e)),
                        Err(_) => tls.failures.note(tls.port, local, from, ("slow", "no handshake within 10 s".into())),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// When a kind of failure from an address was last logged, and how many
/// were left out since.
type Seen = (Option<Instant>, u64);

/// Log lines about failed handshakes on one port: at most one per address
/// and kind of failure in [`LOG_EVERY`], so a stranger retrying in a loop
/// does not fill the log, and a second kind of failure is still seen.
#[derive(Default)]
struct FailureLog {
    /// When each (address, kind) was last logged, and how many were left out since.
    last: Mutex<HashMap<(IpAddr, &'static str), Seen>>,
}

impl FailureLog {
    fn note(&self, port: &str, local: Option<SocketAddr>, from: SocketAddr, (kind, why): (&'static str, String)) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = last.entry((from.ip(), kind)).or_insert((None, 0));
        if entry.0.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            entry.1 += 1;
            return;
        }
        let more = match std::mem::take(&mut entry.1) {
            0 => String::new(),
            n => format!(" ({n} more like it since the last such line)"),
        };
        entry.0 = Some(now);
        if last.len() > 1024 {
            last.retain(|_, (t, _)| t.is_some_and(|t| now.duration_since(t) < LOG_EVERY));
        }
        let on = local.map_or_else(String::new, |a| format!(" {a}"));
        tracing::warn!("TLS handshake on {port} port{on} from {from} failed: {why}{more}");
    }
}

/// What a failed handshake says about the other side, from the server's
/// point of view: a kind, for rate-limiting, and a sentence.
fn server_side_reason(e: &io::Error) -> (&'static str, String) {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_)) => ("not-tls", format!("it does not speak TLS; a plain-text client? ({e})")),
        Some(E::NoCertificatesPresented) => {
            ("no-cert", "it presented no client certificate, and one is required".into())
        }
        Some(E::InvalidCertificate(why)) => ("bad-cert", format!("its certificate was refused: {why}")),
        Some(E::AlertReceived(alert)) => {
            ("alert", format!("it refused this member's certificate or TLS settings (alert {alert:?})"))
        }
        Some(other) => ("other", other.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            ("eof", "it closed the connection during the handshake".into())
        }
        None => ("other", e.to_string()),
    }
}

/// The TLS configuration of the client port's https:// listeners; `hosts`
/// are the names and addresses an `--auto-tls` certificate is made for.
/// HTTP/1.1 is offered beside HTTP/2 for `/health` and `/metrics`.
pub fn client_port(config: &Config, hosts: &[String]) -> Result<ServerTls, TlsError> {
    let pair = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => KeyPair::from_files("cert-file", cert, "key-file", key)?,
        _ => KeyPair::self_signed("auto-tls", hosts)?,
    };
    // As in etcd 3.4, a trusted CA means clients must present a certificate
    // it signed, whether or not --client-cert-auth is given.
    let client_ca = match &config.trusted_ca_file {
        Some(ca) => Some(roots("trusted-ca-file", &ca.display().to_string(), &read("trusted-ca-file", ca)?)?),
        None => None,
    };
    ServerTls::new("client", pair, client_ca, &[b"h2", b"http/1.1"])
}

/// TLS between members: how this member serves its peer port, and how it
/// connects to the others.
pub struct PeerTls {
    /// The peer port's side.
    pub server: ServerTls,
    /// For connections to other members.
    pub client: Arc<ClientConfig>,
}

/// The TLS of the peer port when the peer URLs are https://: the member's
/// peer certificate (or with `--peer-auto-tls` a self-signed one for
/// `hosts`), presented both ways. With `--peer-trusted-ca-file`, every
/// other member's certificate must be signed by that CA, as server and as
/// client. With `--peer-auto-tls` members do not check each other's
/// certificates (there is nothing to check them against), as in etcd; the
/// cluster id and member ids on every peer message still must match.
pub fn peer(config: &Config, hosts: &[String]) -> Result<Option<PeerTls>, TlsError> {
    let pair = match (&config.peer_cert_file, &config.peer_key_file) {
        (Some(cert), Some(key)) => KeyPair::from_files("peer-cert-file", cert, "peer-key-file", key)?,
        _ if config.peer_auto_tls => KeyPair::self_signed("peer-auto-tls", hosts)?,
        _ => return Ok(None),
    };
    let ca = match &config.peer_trusted_ca_file {
        Some(ca) => Some((ca.display().to_string(), read("peer-trusted-ca-file", ca)?)),
        None => None,
    };
    let server_roots = match &ca {
        Some((path, pem)) => Some(roots("peer-trusted-ca-file", path, pem)?),
        None => None,
    };
    let server = ServerTls::new("peer", pair.clone(), server_roots, &[b"h2"])?;
    let trust = match &ca {
        Some((path, pem)) => Trust::Roots(roots("peer-trusted-ca-file", path, pem)?),
        None if config.peer_auto_tls => Trust::Anything,
        None => Trust::System,
    };
    let client = client_config(trust, Some(pair))?;
    Ok(Some(PeerTls { server, client }))
}

/// Which server certificates a client accepts.
pub enum Trust {
    /// Those signed by these CAs.
    Roots(RootCertStore),
    /// Those signed by the system's trusted CAs.
    System,
    /// Any, unchecked (`--insecure-skip-tls-verify`, `--peer-auto-tls`).
    /// The handshake's signatures are still checked, so the connection is
    /// encrypted to whoever holds the presented certificate's key.
    Anything,
}

impl Trust {
    /// The CAs in the PEM file that `flag` named.
    pub fn from_file(flag: &'static str, path: &Path) -> Result<Trust, TlsError> {
        Ok(Trust::Roots(roots(flag, &path.display().to_string(), &read(flag, path)?)?))
    }
}

/// A rustls client configuration: which servers it trusts, and the
/// certificate it presents, if any. It speaks HTTP/2 only.
pub fn client_config(trust: Trust, identity: Option<KeyPair>) -> Result<Arc<ClientConfig>, TlsError> {
    let refused = |why: String| TlsError::Refused { what: "client TLS".into(), why };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(e.to_string()))?;
    let builder = match trust {
        Trust::Roots(roots) => builder.with_root_certificates(roots),
        Trust::System => {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            builder.with_root_certificates(roots)
        }
        Trust::Anything => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AnyServer { provider: provider() }))
        }
    };
    let mut config = match identity {
        Some(pair) => builder.with_client_auth_cert(pair.chain, pair.key).map_err(|e| refused(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server certificate, but checks that the server holds its key.
#[derive(Debug)]
struct AnyServer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A lazily connecting gRPC channel to `url` (`https://host:port`) over TLS
/// with `config`, from `local` if given. `endpoint` carries the other
/// settings (timeouts, keep-alive); its URL must be the same address as
/// http://, since the TLS is done here rather than by tonic.
pub fn channel(endpoint: Endpoint, config: Arc<ClientConfig>, local: Option<IpAddr>) -> Channel {
    let connector = tower::service_fn(move |uri: http::Uri| connect(uri, config.clone(), local));
    endpoint.connect_with_connector_lazy(connector)
}

/// The same address as `url` with http:// in place of https://, for
/// [`channel`]'s endpoint.
pub fn plain_url(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_string(),
    }
}

async fn connect(
    uri: http::Uri,
    config: Arc<ClientConfig>,
    local: Option<IpAddr>,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = uri.host().ok_or_else(|| io::Error::other(format!("{uri} names no host")))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let mut last = io::Error::other(format!("{bare}:{port} resolves to no address"));
    let mut tcp = None;
    for addr in tokio::net::lookup_host((bare.as_str(), port)).await? {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        match socket.connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or(last)?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(bare.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{bare} is no server name: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {bare}:{port} failed: {e}")))?;
    Ok(TokioIo::new(stream))
}

/// The common name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}
