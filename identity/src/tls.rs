//! The rustls client every Drover program uses to dial the controller, and the pieces of the
//! controller's server TLS identity.
//!
//! Clients trust exactly one CA (the Drover CA) and verify the fixed server name
//! [`CONTROLLER_SERVER_NAME`]. During enrollment the agent has no CA yet: it accepts the
//! controller only if the chain it presents contains a CA whose SHA-256 fingerprint equals the
//! one carried in the enrollment token, then verifies the leaf against that CA.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::fingerprint_der;
use crate::{CONTROLLER_SERVER_NAME, Error};

/// Whether `host` (a name, an IP address, or `[v6]` as in a URL) is this machine: the only
/// place Drover sends anything without TLS (a local relay, a test server).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Installs ring as the process-wide rustls provider. Call once at start-up; later calls are
/// harmless. (With more than one provider compiled in, rustls refuses to guess.)
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How a client decides to trust the controller.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The Drover CA certificate (PEM), as stored after enrollment.
    Ca(String),
    /// Only the SHA-256 fingerprint of the CA, from an enrollment token.
    PinnedFingerprint(String),
}

/// A client certificate and key, both PEM.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Parses all certificates of a PEM string.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls("no certificate found in PEM".into()));
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| Error::Tls(format!("bad private key PEM: {e}")))?
        .ok_or_else(|| Error::Tls("no private key found in PEM".into()))
}

/// Builds the rustls client configuration for talking to the controller.
pub fn client_config(trust: &Trust, cert: Option<&ClientCert>) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let builder = match trust {
        Trust::Ca(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for cert in certs_from_pem(ca_pem)? {
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("bad CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::PinnedFingerprint(fp) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
                    fingerprint: fp.to_ascii_lowercase(),
                    provider,
                }))
        }
    };
    let mut config = match cert {
        Some(c) => builder
            .with_client_auth_cert(certs_from_pem(&c.cert_pem)?, key_from_pem(&c.key_pem)?)
            .map_err(|e| Error::Tls(format!("client certificate and key do not match: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The controller's rustls server configuration: its chain and key, client certificates
/// optional (enrollment has none yet) but verified against the Drover CA when given, HTTP/2
/// only.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs_from_pem(ca_pem)? {
        roots
            .add(ca)
            .map_err(|e| Error::Tls(format!("bad CA certificate: {e}")))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(chain_pem)?, key_from_pem(key_pem)?)
        .map_err(|e| Error::Tls(format!("server certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Normalises a controller address (`host:port`, `https://host:port`) to `host:port`.
pub fn controller_authority(addr: &str) -> Result<String, Error> {
    let trimmed = addr
        .trim()
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if trimmed.starts_with("http://") {
        return Err(Error::Tls(format!(
            "controller address {addr:?} uses http://: Drover only speaks TLS, use https:// or host:port"
        )));
    }
    let uri: Uri = format!("https://{trimmed}")
        .parse()
        .map_err(|e| Error::Tls(format!("bad controller address {addr:?}: {e}")))?;
    match (uri.host(), uri.port_u16()) {
        (Some(host), Some(port)) => Ok(format!("{host}:{port}")),
        (Some(host), None) => Ok(format!("{host}:7443")),
        _ => Err(Error::Tls(format!(
            "bad controller address {addr:?}: expected host:port"
        ))),
    }
}

/// Opens a gRPC channel to the controller over our own rustls client. The channel connects
/// lazily: connection and handshake errors show up on the first call.
pub fn channel(
    addr: &str,
    config: ClientConfig,
    connect_timeout: Duration,
) -> Result<Channel, Error> {
    channel_from(addr, config, connect_timeout, None)
}

/// [`channel`], its connections made from the local address `source` when given (a benchmark
/// spreading simulated hosts over loopback addresses).
pub fn channel_from(
    addr: &str,
    config: ClientConfig,
    connect_timeout: Duration,
    source: Option<std::net::IpAddr>,
) -> Result<Channel, Error> {
    let authority = controller_authority(addr)?;
    // The scheme here is only for tonic's bookkeeping: the connector below does the TLS.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| Error::Tls(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(CONTROLLER_SERVER_NAME)
        .map_err(|e| Error::Tls(e.to_string()))?
        .to_owned();
    let make = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let authority = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| io::Error::other("no authority in controller URI"))?;
            let tcp = match source {
                None => TcpStream::connect(authority).await?,
                Some(source) => connect_from(source, &authority).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(make))
}

async fn connect_from(source: std::net::IpAddr, authority: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::other(format!("{authority} resolves to no address"));
    for addr in tokio::net::lookup_host(authority).await? {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(std::net::SocketAddr::new(source, 0))?;
        match socket.connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Accepts a server chain only if it contains the CA with the pinned fingerprint and the leaf
/// verifies against that CA for [`CONTROLLER_SERVER_NAME`].
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint_der(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the controller's CA does not match the fingerprint in the enrollment token"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The innermost cause of a transport failure, which is the part that says what happened
/// (connection refused, certificate expired, unknown CA...).
pub fn describe_transport(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(err) = source {
        text = err.to_string();
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["10.0.0.1", "example.org", "localhost.example.org", "[::2]"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn controller_addresses_normalise() {
        assert_eq!(
            controller_authority("127.0.0.1:7443").unwrap(),
            "127.0.0.1:7443"
        );
        assert_eq!(
            controller_authority("https://ctl.example:9000/").unwrap(),
            "ctl.example:9000"
        );
        assert_eq!(
            controller_authority("ctl.example").unwrap(),
            "ctl.example:7443"
        );
        let err = controller_authority("http://ctl:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("only speaks TLS"), "{err}");
    }
}
