//! TLS on the client and peer ports, with etcd's flags. Client port: `--cert-file`/`--key-file` or
//! `--auto-tls` (a self-signed certificate made at start), and
//! `--trusted-ca-file` (with or without `--client-cert-auth`, as in etcd
//! 3.4) for client certificates, which are then required. Peer port:
//! `--peer-cert-file`/`--peer-key-file` on https:// peer URLs, presented
//! both ways, `--peer-trusted-ca-file` for the other members' certificates,
//! and `--peer-cert-allowed-cn`, which `grpc::peer` checks.
//! rustls does the work, through tonic.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::Config;

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
    /// A self-signed certificate could not be made.
    #[error("--auto-tls: cannot make a certificate: {0}")]
    AutoTls(String),
}

fn read_pem(flag: &'static str, path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read { flag, path: shown.clone(), why: e.to_string() })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = match what {
        "private key" => text.contains("PRIVATE KEY-----"),
        _ => text.contains("-----BEGIN CERTIFICATE-----"),
    };
    if !found {
        return Err(TlsError::NotPem { flag, path: shown, what });
    }
    Ok(bytes)
}

/// The TLS configuration of the client port's https:// listeners; `hosts`
/// are the names and addresses an `--auto-tls` certificate is made for.
pub fn client_port(config: &Config, hosts: &[String]) -> Result<ServerTlsConfig, TlsError> {
    let identity = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            Identity::from_pem(read_pem("cert-file", cert, "certificate")?, read_pem("key-file", key, "private key")?)
        }
        _ => {
            let made =
                rcgen::generate_simple_self_signed(hosts.to_vec()).map_err(|e| TlsError::AutoTls(e.to_string()))?;
            Identity::from_pem(made.cert.pem(), made.signing_key.serialize_pem())
        }
    };
    let mut tls = ServerTlsConfig::new().identity(identity);
    // As in etcd 3.4, a trusted CA means clients must present a certificate
    // it signed, whether or not --client-cert-auth is given.
    if let Some(ca) = &config.trusted_ca_file {
        let ca = read_pem("trusted-ca-file", ca, "certificate")?;
        tls = tls.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(false);
    }
    Ok(tls)
}

/// The TLS configuration of the peer port when its URL is https://: the
/// member's peer certificate, and with `--peer-trusted-ca-file` the CA
/// that every other member's certificate must be signed by (required, as
/// on the client port).
pub fn peer_server(config: &Config) -> Result<Option<ServerTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&config.peer_cert_file, &config.peer_key_file) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(
        read_pem("peer-cert-file", cert, "certificate")?,
        read_pem("peer-key-file", key, "private key")?,
    );
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &config.peer_trusted_ca_file {
        let ca = read_pem("peer-trusted-ca-file", ca, "certificate")?;
        tls = tls.client_ca_root(Certificate::from_pem(ca)).client_auth_optional(false);
    }
    Ok(Some(tls))
}

/// How this member connects to other members when the peer URLs are
/// https://: it checks their certificates against `--peer-trusted-ca-file`
/// (else the system's roots) and presents its own peer certificate.
pub fn peer_client(config: &Config) -> Result<Option<tonic::transport::ClientTlsConfig>, TlsError> {
    let (Some(cert), Some(key)) = (&config.peer_cert_file, &config.peer_key_file) else {
        return Ok(None);
    };
    let mut tls = tonic::transport::ClientTlsConfig::new().identity(Identity::from_pem(
        read_pem("peer-cert-file", cert, "certificate")?,
        read_pem("peer-key-file", key, "private key")?,
    ));
    tls = match &config.peer_trusted_ca_file {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read_pem("peer-trusted-ca-file", ca, "certificate")?)),
        None => tls.with_native_roots(),
    };
    Ok(Some(tls))
}

/// The common name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}
