//! One-time enrollment: make a key on this host, send a CSR with the token, pin the CA by the
//! fingerprint in the token, store certificate and key (0600) under the data dir. And
//! re-enrollment: when the certificate expired while the agent could not renew it, a CSR made
//! with the same key gets a fresh one (within the controller's grace), over server-auth TLS
//! pinned to the stored CA.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_identity::Identity;
use drover_identity::files::{Bundle, write_public};
use drover_identity::pki::{CertInfo, csr_for_key, fingerprint_pem, new_key_and_csr, unix_now};
use drover_identity::tls::{Trust, channel, client_config};
use drover_identity::token::EnrollToken;
use drover_proto::v1;
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// Where enrollment put things under the data dir.
#[derive(Debug, Clone)]
pub struct Paths {
    pub identity_dir: PathBuf,
    pub enrollment_file: PathBuf,
    pub store_dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path) -> Paths {
        Paths {
            identity_dir: data_dir.join("identity"),
            enrollment_file: data_dir.join("enrollment.toml"),
            store_dir: data_dir.join("store"),
        }
    }
}

/// What the agent remembers of its enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub host: String,
    pub controller: String,
    pub enrolled_unix: i64,
}

impl Enrollment {
    pub fn load(paths: &Paths) -> Result<Enrollment, AgentError> {
        let text = std::fs::read_to_string(&paths.enrollment_file)
            .map_err(|_| AgentError::NotEnrolled(paths.enrollment_file.display().to_string()))?;
        toml::from_str(&text)
            .map_err(|e| AgentError::Corrupt(format!("{}: {e}", paths.enrollment_file.display())))
    }
}

/// How long an enrollment call may take, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Enrolls this host with the controller at `controller` using `token`. The host's labels
/// come from the token. An identity already in the data dir is replaced only when its
/// certificate has expired (a host that stayed offline past the re-enrollment grace), and
/// only by one for the same host.
pub async fn enroll(
    controller: &str,
    token: &str,
    data_dir: &Path,
) -> Result<Enrollment, AgentError> {
    let token = EnrollToken::parse(token)?;
    let paths = Paths::new(data_dir);
    Bundle::recover(&paths.identity_dir)?;
    if Bundle::exists(&paths.identity_dir) {
        replaceable(&paths, &token.host)?;
    }
    let (key_pem, csr_pem) = new_key_and_csr(&token.host)?;
    let config = client_config(
        &Trust::PinnedFingerprint(token.ca_fingerprint.clone()),
        None,
    )?;
    let mut client = v1::enrollment_client::EnrollmentClient::new(channel(
        controller,
        config,
        Duration::from_secs(10),
    )?);
    let mut request = tonic::Request::new(v1::EnrollRequest {
        token: token.encode(),
        csr_pem,
        host: token.host.clone(),
        labels: Default::default(),
    });
    request.set_timeout(CALL_TIMEOUT);
    let response = client
        .enroll(request)
        .await
        .map_err(|status| AgentError::from_status(controller, status))?
        .into_inner();

    // Trust, but check: the CA must be the pinned one and the certificate must name this host.
    if fingerprint_pem(&response.ca_pem)? != token.ca_fingerprint {
        return Err(AgentError::Corrupt(
            "the controller returned a CA that does not match the token's fingerprint".into(),
        ));
    }
    let info = CertInfo::from_pem(&response.cert_pem)?;
    let expected = Identity::Agent {
        host: token.host.clone(),
    };
    if info.identity.as_ref() != Some(&expected) {
        return Err(AgentError::Corrupt(format!(
            "the controller issued a certificate for {:?}, not for host {}",
            info.identity, token.host
        )));
    }
    // The whole bundle at once: an expired identity being replaced is never half replaced.
    Bundle {
        ca_pem: response.ca_pem,
        cert_pem: response.cert_pem,
        key_pem,
    }
    .replace(&paths.identity_dir)?;
    let enrollment = Enrollment {
        host: token.host,
        controller: controller.to_string(),
        enrolled_unix: unix_now(),
    };
    let text = toml::to_string(&enrollment).map_err(|e| AgentError::Corrupt(e.to_string()))?;
    write_public(&paths.enrollment_file, text.as_bytes())?;
    Ok(enrollment)
}

/// May the identity in the data dir be replaced by a new enrollment as `host`? Only a dead
/// one (its certificate expired) of the same host: the outbox and job state under the data dir
/// belong to that host.
fn replaceable(paths: &Paths, host: &str) -> Result<(), AgentError> {
    let already = || AgentError::AlreadyEnrolled {
        dir: paths.identity_dir.display().to_string(),
    };
    let cert = Bundle::load(&paths.identity_dir)
        .ok()
        .and_then(|b| CertInfo::from_pem(&b.cert_pem).ok())
        .ok_or_else(already)?;
    if cert.not_after_unix > unix_now() {
        return Err(already());
    }
    match &cert.identity {
        Some(Identity::Agent { host: enrolled }) if enrolled == host => Ok(()),
        Some(Identity::Agent { host: enrolled }) => Err(AgentError::Corrupt(format!(
            "this data dir belongs to host {enrolled}, and the token is for host {host}: use a token for {enrolled} (`drover token create --host {enrolled}`), or another --data-dir"
        ))),
        _ => Err(already()),
    }
}

/// Gets a fresh certificate for the (expired) one in the identity dir: a CSR signed with the
/// same key proves this host still holds it. The controller refuses once the certificate is
/// older than its grace, or the host was revoked or enrolled again elsewhere
/// ([`AgentError::ReenrollRefused`]: enroll again with a new token). Returns the new
/// certificate, already swapped in with the key.
pub async fn reenroll(paths: &Paths, controller: &str) -> Result<CertInfo, AgentError> {
    Bundle::recover(&paths.identity_dir)?;
    let bundle = Bundle::load(&paths.identity_dir)?;
    let current = CertInfo::from_pem(&bundle.cert_pem)?;
    let Some(Identity::Agent { host }) = current.identity.clone() else {
        return Err(AgentError::Corrupt(format!(
            "{} holds no agent certificate",
            paths.identity_dir.display()
        )));
    };
    let csr_pem = csr_for_key(&bundle.key_pem, &host)?;
    // Server authentication only (the expired certificate would be refused by TLS), pinned to
    // the CA stored at enrollment.
    let config = client_config(&Trust::Ca(bundle.ca_pem.clone()), None)?;
    let mut client = v1::enrollment_client::EnrollmentClient::new(channel(
        controller,
        config,
        Duration::from_secs(10),
    )?);
    let mut request = tonic::Request::new(v1::ReenrollRequest {
        cert_pem: bundle.cert_pem.clone(),
        csr_pem,
    });
    request.set_timeout(CALL_TIMEOUT);
    let response = client
        .reenroll(request)
        .await
        .map_err(|status| match AgentError::from_status(controller, status) {
            AgentError::Refused { message } => AgentError::ReenrollRefused {
                host: host.clone(),
                controller: controller.to_string(),
                // The controller's own advice is what the error says next, in full.
                message: message
                    .split("; enroll it again")
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            },
            other => other,
        })?
        .into_inner();
    let info = CertInfo::from_pem(&response.cert_pem)?;
    if info.identity != current.identity || info.public_key != current.public_key {
        return Err(AgentError::Corrupt(
            "the controller re-issued a certificate for another host or another key".into(),
        ));
    }
    if fingerprint_pem(&response.ca_pem)? != fingerprint_pem(&bundle.ca_pem)? {
        return Err(AgentError::Corrupt(
            "the controller answered with another CA than the one stored at enrollment".into(),
        ));
    }
    Bundle {
        ca_pem: bundle.ca_pem,
        cert_pem: response.cert_pem,
        key_pem: bundle.key_pem,
    }
    .replace(&paths.identity_dir)?;
    Ok(info)
}
