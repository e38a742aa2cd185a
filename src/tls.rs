//! TLS for both sides: the gateway's server config from PEM files, and the client config that trusts the
//! webpki roots plus optional extra CA certificates.
//!
//! Every config names the aws-lc-rs crypto provider explicitly. It is the provider rustls already gets through
//! lapin, and naming it keeps the configs independent of rustls' process-wide default provider.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The only application protocol the gateway speaks; WebSocket upgrades need HTTP/1.1.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// A TLS file that could not be loaded, or a config that could not be built from it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {} not found; check the path", path.display())]
    NotFound { what: &'static str, path: PathBuf },
    #[error("cannot read {what} {}: {error}; check the path and the file's permissions", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("{what} {} is not valid PEM: {reason}", path.display())]
    InvalidPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "{what} {} contains no certificate; expected PEM blocks that start with -----BEGIN CERTIFICATE-----",
        path.display()
    )]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error(
        "{what} {} contains no unencrypted private key; expected a PEM block that starts with \
         -----BEGIN PRIVATE KEY----- (PKCS#8), -----BEGIN RSA PRIVATE KEY----- or -----BEGIN EC PRIVATE KEY-----",
        path.display()
    )]
    NoPrivateKey { what: &'static str, path: PathBuf },
    #[error(
        "the private key in {} does not match the first certificate in {}; the server's own certificate must \
         come first in server.tls_cert, and server.tls_key must be its key",
        key.display(),
        cert.display()
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot use the certificate in {} with the key in {}: {reason}", cert.display(), key.display())]
    InvalidKeyPair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{what} {} contains an invalid CA certificate (number {number} in the file): {reason}", path.display())]
    InvalidCaCertificate {
        what: &'static str,
        path: PathBuf,
        number: usize,
        reason: String,
    },
}

/// Loads the gateway's certificate chain and private key (both PEM) into a server config for HTTP/1.1.
///
/// `cert` contains the server's certificate first, then any intermediate certificates. Fails when a file is
/// missing or unreadable, contains no certificate or key, or when the key does not belong to the first
/// certificate.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates("server.tls_cert file", cert)?;
    let key_der = read_private_key("server.tls_key file", key)?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .and_then(|builder| {
            builder
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
        })
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                }
            }
            other => TlsError::InvalidKeyPair {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings of a client: which certificate authorities it trusts. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Trusts the webpki roots (Mozilla's CA list) and, when `ca_cert` is set, every certificate in that PEM
    /// file, such as a private CA that signed the gateway's certificate.
    pub fn new(ca_cert: Option<&Path>) -> Result<ClientTls, TlsError> {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = ca_cert {
            let what = "CA certificate file";
            for (index, certificate) in read_certificates(what, path)?.into_iter().enumerate() {
                roots
                    .add(certificate)
                    .map_err(|error| TlsError::InvalidCaCertificate {
                        what,
                        path: path.to_path_buf(),
                        number: index + 1,
                        reason: error.to_string(),
                    })?;
            }
        }
        Ok(ClientTls {
            config: Arc::new(client_config(roots)),
        })
    }

    /// Returns the rustls config, for connectors such as tokio-tungstenite's.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }

    /// Runs the TLS handshake on `stream`, verifying the server's certificate for `host` (a DNS name or an IP
    /// address, without brackets).
    pub async fn connect<S>(&self, host: &str, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(host.to_owned()).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid TLS server name {host:?}: {error}"),
            )
        })?;
        TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
    }
}

impl Default for ClientTls {
    /// Trusts the webpki roots only.
    fn default() -> Self {
        ClientTls {
            config: Arc::new(client_config(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })),
        }
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn client_config(roots: RootCertStore) -> ClientConfig {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        // The aws-lc-rs default provider supports TLS 1.2 and 1.3, so a safe default version always exists.
        .expect("aws-lc-rs supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    config
}

/// Reads a whole file, telling a missing file apart from other read errors.
fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => TlsError::NotFound {
            what,
            path: path.to_path_buf(),
        },
        _ => TlsError::Read {
            what,
            path: path.to_path_buf(),
            error,
        },
    })
}

/// Reads every certificate in a PEM file, in file order, and skips other PEM blocks such as a key.
fn read_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|error| TlsError::InvalidPem {
            what,
            path: path.to_path_buf(),
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certificates)
}

/// Reads the first PKCS#8, PKCS#1 or SEC1 private key in a PEM file.
fn read_private_key(what: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_file(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            what,
            path: path.to_path_buf(),
        },
        other => TlsError::InvalidPem {
            what,
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// Finds the rustls error behind a failed TLS handshake, looking through the error's sources and through the
/// `io::Error` that tokio-rustls wraps it in.
pub fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        // `io::Error::source` skips the wrapped error itself, so step into it with `get_ref`.
        current = match error.downcast_ref::<io::Error>() {
            Some(io_error) => match io_error.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => error.source(),
            },
            None => error.source(),
        };
    }
    None
}

/// Describes a failed client handshake and, for the common causes, the next step to fix it.
pub fn describe_handshake_error(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the server's certificate is not trusted: it was not issued by a trusted certificate authority. \
             Pass the CA certificate that signed it with --ca-cert FILE (or WSGW_CA_CERT)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "{error}; connect with a host name or address that the server's certificate lists"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("{error}; the server needs a renewed certificate"),
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            "the server did not respond with TLS; if it serves plain HTTP, use an http:// or ws:// URL".to_owned()
        }
        other => other.to_string(),
    }
}
