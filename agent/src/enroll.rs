//! One-time enrollment: make a key on this host, send a CSR with the token, pin the CA by the
//! fingerprint in the token, store certificate and key (0600) under the data dir.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_identity::Identity;
use drover_identity::files::{Bundle, write_public};
use drover_identity::pki::{CertInfo, fingerprint_pem, new_key_and_csr};
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
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Enrollment {
    pub fn load(paths: &Paths) -> Result<Enrollment, AgentError> {
        let text = std::fs::read_to_string(&paths.enrollment_file)
            .map_err(|_| AgentError::NotEnrolled(paths.enrollment_file.display().to_string()))?;
        toml::from_str(&text)
            .map_err(|e| AgentError::Corrupt(format!("{}: {e}", paths.enrollment_file.display())))
    }
}

/// Enrolls this host with the controller at `controller` using `token`.
pub async fn enroll(
    controller: &str,
    token: &str,
    data_dir: &Path,
    labels: BTreeMap<String, String>,
) -> Result<Enrollment, AgentError> {
    let token = EnrollToken::parse(token)?;
    let paths = Paths::new(data_dir);
    Bundle::recover(&paths.identity_dir)?;
    if Bundle::exists(&paths.identity_dir) {
        return Err(AgentError::AlreadyEnrolled {
            dir: paths.identity_dir.display().to_string(),
        });
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
    let response = client
        .enroll(v1::EnrollRequest {
            token: token.encode(),
            csr_pem,
            host: token.host.clone(),
            labels: labels.clone().into_iter().collect(),
        })
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
    Bundle {
        ca_pem: response.ca_pem,
        cert_pem: response.cert_pem,
        key_pem,
    }
    .save(&paths.identity_dir)?;
    let enrollment = Enrollment {
        host: token.host,
        controller: controller.to_string(),
        enrolled_unix: drover_identity::pki::unix_now(),
        labels,
    };
    let text = toml::to_string(&enrollment).map_err(|e| AgentError::Corrupt(e.to_string()))?;
    write_public(&paths.enrollment_file, text.as_bytes())?;
    Ok(enrollment)
}
