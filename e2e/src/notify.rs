//! Local receivers for notification tests, on 127.0.0.1:0: a webhook server (plain HTTP, or
//! HTTPS with a certificate from a test CA) that records every request and answers what the
//! test says, and an SMTP sink (plain, or STARTTLS with the test CA's certificate; AUTH PLAIN
//! and LOGIN) that records each message and the credentials it was given.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::TlsAcceptor;

/// A throw-away CA for test servers (not the Drover CA: nothing else trusts it).
pub struct TestCa {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Drover notify test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the CA certificate (PEM) to `path`, for a `ca_file`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, &self.cert_pem).unwrap();
    }

    /// A TLS server configuration with a fresh certificate for `names` (IP addresses become
    /// IP SANs), signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Arc::new(config)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// One request a [`WebhookReceiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub body: Value,
    /// The status code it was answered with.
    pub answered: u16,
    pub over_tls: bool,
}

type Answer = Arc<dyn Fn(&str, usize) -> u16 + Send + Sync>;

/// A webhook server that records every JSON body.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl WebhookReceiver {
    /// Plain HTTP, answering 200 to everything.
    pub async fn start_ok() -> WebhookReceiver {
        WebhookReceiver::start(None, |_, _| 200).await
    }

    /// HTTPS when `tls` is given. `answer(path, n)` is the status code of the `n`th request
    /// (from 0) to `path`.
    pub async fn start(
        tls: Option<Arc<rustls::ServerConfig>>,
        answer: impl Fn(&str, usize) -> u16 + Send + Sync + 'static,
    ) -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let answer: Answer = Arc::new(answer);
        let acceptor = tls.map(TlsAcceptor::from);
        let kept = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (kept, answer, acceptor) = (kept.clone(), answer.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        // A client that refuses the certificate ends here.
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve_http(tls, true, kept, answer).await;
                            }
                        }
                        None => serve_http(stream, false, kept, answer).await,
                    }
                });
            }
        });
        WebhookReceiver { addr, received }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The statuses (`open`, `resolved`) delivered for `key` to `path`: requests answered
    /// with 2xx, in order.
    pub fn delivered(&self, path: &str, key: &str) -> Vec<String> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path && r.body["alert"] == key && r.answered / 100 == 2)
            .map(|r| r.body["status"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// How many requests reached `path`, whatever they were answered.
    pub fn attempts(&self, path: &str) -> usize {
        self.received().iter().filter(|r| r.path == path).count()
    }
}

async fn serve_http<S>(stream: S, over_tls: bool, kept: Arc<Mutex<Vec<Received>>>, answer: Answer)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (kept, answer) = (kept.clone(), answer.clone());
        async move {
            let path = req.uri().path().to_string();
            let bytes = req.into_body().collect().await?.to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let code = {
                let mut kept = kept.lock().unwrap();
                let n = kept.iter().filter(|r| r.path == path).count();
                let code = answer(&path, n);
                kept.push(Received {
                    path,
                    body,
                    answered: code,
                    over_tls,
                });
                code
            };
            let mut response = hyper::Response::new(Full::new(Bytes::from("ok")));
            *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
            Ok::<_, hyper::Error>(response)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// Credentials an [`SmtpSink`] was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpLogin {
    pub mechanism: String,
    pub username: String,
    pub password: String,
    pub over_tls: bool,
}

/// A minimal SMTP server: 220, EHLO/HELO, STARTTLS (when it has a certificate), AUTH PLAIN
/// and LOGIN (when it offers mechanisms: then required before MAIL, and offered only after
/// STARTTLS when it has a certificate), MAIL/RCPT, DATA, QUIT. Keeps each message's DATA.
pub struct SmtpSink {
    pub addr: SocketAddr,
    messages: Arc<Mutex<Vec<String>>>,
    logins: Arc<Mutex<Vec<SmtpLogin>>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
struct SmtpSetup {
    acceptor: Option<TlsAcceptor>,
    mechanisms: Vec<String>,
    messages: Arc<Mutex<Vec<String>>>,
    logins: Arc<Mutex<Vec<SmtpLogin>>>,
}

impl SmtpSink {
    /// `tls`: offer STARTTLS with this configuration; `mechanisms`: AUTH mechanisms to offer
    /// (`PLAIN`, `LOGIN`), none for a relay that needs no login.
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>, mechanisms: &[&str]) -> SmtpSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let setup = SmtpSetup {
            acceptor: tls.map(TlsAcceptor::from),
            mechanisms: mechanisms.iter().map(|m| m.to_string()).collect(),
            messages: Arc::default(),
            logins: Arc::default(),
        };
        let sink = SmtpSink {
            addr,
            messages: setup.messages.clone(),
            logins: setup.logins.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let setup = setup.clone();
                tokio::spawn(async move {
                    let _ = smtp_session(Box::new(stream), setup).await;
                });
            }
        });
        sink
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }

    pub fn logins(&self) -> Vec<SmtpLogin> {
        self.logins.lock().unwrap().clone()
    }
}

async fn reply(conn: &mut BufReader<Box<dyn Io>>, text: &str) -> std::io::Result<()> {
    conn.get_mut().write_all(text.as_bytes()).await?;
    conn.get_mut().flush().await
}

async fn read_line(conn: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
}

fn unbase64(text: &str) -> String {
    String::from_utf8(B64.decode(text.trim()).unwrap_or_default()).unwrap_or_default()
}

async fn smtp_session(stream: Box<dyn Io>, setup: SmtpSetup) -> std::io::Result<()> {
    let mut conn = BufReader::new(stream);
    let mut over_tls = false;
    let mut logged_in = false;
    reply(&mut conn, "220 sink ESMTP\r\n").await?;
    while let Some(line) = read_line(&mut conn).await? {
        let upper = line.to_ascii_uppercase();
        let verb = upper.split(' ').next().unwrap_or("").to_string();
        // AUTH is offered over TLS only when TLS is offered at all.
        let may_auth = !setup.mechanisms.is_empty() && (over_tls || setup.acceptor.is_none());
        match verb.as_str() {
            "EHLO" | "HELO" => {
                let mut lines = vec!["sink".to_string()];
                if setup.acceptor.is_some() && !over_tls {
                    lines.push("STARTTLS".into());
                }
                if may_auth {
                    lines.push(format!("AUTH {}", setup.mechanisms.join(" ")));
                }
                let mut text = String::new();
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                    text.push_str(&format!("250{sep}{l}\r\n"));
                }
                reply(&mut conn, &text).await?;
            }
            "STARTTLS" => {
                let Some(acceptor) = setup.acceptor.clone().filter(|_| !over_tls) else {
                    reply(&mut conn, "502 no TLS here\r\n").await?;
                    continue;
                };
                reply(&mut conn, "220 go ahead\r\n").await?;
                // The client waits for the 220 before its handshake: nothing is buffered.
                let tls = acceptor.accept(conn.into_inner()).await?;
                conn = BufReader::new(Box::new(tls));
                over_tls = true;
            }
            "AUTH" if may_auth => {
                let parts: Vec<&str> = line.split(' ').collect();
                let mechanism = parts.get(1).unwrap_or(&"").to_ascii_uppercase();
                if !setup.mechanisms.contains(&mechanism) {
                    reply(&mut conn, "504 mechanism not offered\r\n").await?;
                    continue;
                }
                let (username, password) = if mechanism == "PLAIN" {
                    let initial = match parts.get(2) {
                        Some(initial) => initial.to_string(),
                        None => {
                            reply(&mut conn, "334 \r\n").await?;
                            read_line(&mut conn).await?.unwrap_or_default()
                        }
                    };
                    let decoded = unbase64(&initial);
                    let mut fields = decoded.split('\0').skip(1);
                    (
                        fields.next().unwrap_or("").to_string(),
                        fields.next().unwrap_or("").to_string(),
                    )
                } else {
                    reply(&mut conn, &format!("334 {}\r\n", B64.encode("Username:"))).await?;
                    let user = unbase64(&read_line(&mut conn).await?.unwrap_or_default());
                    reply(&mut conn, &format!("334 {}\r\n", B64.encode("Password:"))).await?;
                    let pass = unbase64(&read_line(&mut conn).await?.unwrap_or_default());
                    (user, pass)
                };
                setup.logins.lock().unwrap().push(SmtpLogin {
                    mechanism,
                    username,
                    password,
                    over_tls,
                });
                logged_in = true;
                reply(&mut conn, "235 authenticated\r\n").await?;
            }
            "MAIL" if !setup.mechanisms.is_empty() && !logged_in => {
                reply(&mut conn, "530 authentication required\r\n").await?;
            }
            "MAIL" | "RCPT" | "RSET" | "NOOP" => reply(&mut conn, "250 ok\r\n").await?,
            "DATA" => {
                reply(&mut conn, "354 go ahead\r\n").await?;
                let mut body = String::new();
                while let Some(line) = read_line(&mut conn).await? {
                    if line == "." {
                        break;
                    }
                    body.push_str(&line);
                    body.push('\n');
                }
                setup.messages.lock().unwrap().push(body);
                reply(&mut conn, "250 queued\r\n").await?;
            }
            "QUIT" => {
                let _ = reply(&mut conn, "221 bye\r\n").await;
                return Ok(());
            }
            _ => reply(&mut conn, "502 not here\r\n").await?,
        }
    }
    Ok(())
}
