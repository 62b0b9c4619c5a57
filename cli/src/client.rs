//! How `drover` finds its controller and identity, connects, and turns gRPC failures into
//! [`CliError`]s that say what to do.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_identity::files::Bundle;
use drover_identity::tls::{ClientCert, Trust, channel, client_config};
use drover_proto::v1::operator_service_client::OperatorServiceClient;
use tonic::transport::Channel;

use super::CliError;

/// The default controller address when nothing else says.
pub const DEFAULT_CONTROLLER: &str = "127.0.0.1:7443";

/// Where a setting came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<T> {
    pub value: T,
    pub source: String,
}

/// The user's config directory for drover (`$XDG_CONFIG_HOME/drover` or `~/.config/drover`).
pub fn config_dir() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("drover"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config").join("drover"))
}

#[derive(Debug, Default, serde::Deserialize)]
struct UserConfig {
    controller: Option<String>,
    identity: Option<PathBuf>,
}

fn user_config() -> Option<(UserConfig, PathBuf)> {
    let path = config_dir()?.join("config.toml");
    let text = std::fs::read_to_string(&path).ok()?;
    toml::from_str(&text).ok().map(|c| (c, path))
}

/// `--controller` or `DROVER_CONTROLLER` (clap fills both into `flag`), then
/// `~/.config/drover/config.toml`, then the local default.
pub fn resolve_controller(flag: Option<&str>) -> Resolved<String> {
    if let Some(addr) = flag.filter(|a| !a.is_empty()) {
        return Resolved {
            value: addr.to_string(),
            source: "--controller / DROVER_CONTROLLER".into(),
        };
    }
    if let Some((
        UserConfig {
            controller: Some(addr),
            ..
        },
        path,
    )) = user_config()
    {
        return Resolved {
            value: addr,
            source: path.display().to_string(),
        };
    }
    Resolved {
        value: DEFAULT_CONTROLLER.to_string(),
        source: "default".into(),
    }
}

/// The places an identity bundle is looked for, in order, when no flag names one.
pub fn identity_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some((
        UserConfig {
            identity: Some(dir),
            ..
        },
        _,
    )) = user_config()
    {
        out.push(dir);
    }
    if let Some(dir) = config_dir() {
        out.push(dir.join("identity"));
    }
    // On the controller host: the admin bundle made on first start.
    out.push(PathBuf::from("/var/lib/drover-controller/operator/admin"));
    // `drover-controller dev` in the current directory.
    out.push(PathBuf::from(".drover-dev/controller/operator/admin"));
    out
}

/// `--identity` or `DROVER_IDENTITY`, else the first candidate that holds a bundle.
pub fn resolve_identity(flag: Option<&Path>) -> Result<Resolved<PathBuf>, CliError> {
    if let Some(dir) = flag {
        if !Bundle::exists(dir) {
            return Err(CliError::NoIdentity(format!(
                "{} does not hold an identity bundle (ca.pem, cert.pem, key.pem)",
                dir.display()
            )));
        }
        return Ok(Resolved {
            value: dir.to_path_buf(),
            source: "--identity / DROVER_IDENTITY".into(),
        });
    }
    let candidates = identity_candidates();
    for dir in &candidates {
        if Bundle::exists(dir) && std::fs::File::open(dir.join(Bundle::KEY)).is_ok() {
            return Ok(Resolved {
                value: dir.clone(),
                source: "default location".into(),
            });
        }
    }
    Err(CliError::NoIdentity(format!(
        "no operator identity found (looked in {}); pass --identity DIR or set DROVER_IDENTITY",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A connected operator client.
#[derive(Debug, Clone)]
pub struct Client {
    pub api: OperatorServiceClient<Channel>,
    pub controller: String,
}

pub fn connect(
    controller: &Resolved<String>,
    identity: &Resolved<PathBuf>,
) -> Result<Client, CliError> {
    let bundle = Bundle::load(&identity.value).map_err(|e| {
        CliError::NoIdentity(format!(
            "cannot read identity {}: {e}",
            identity.value.display()
        ))
    })?;
    let config = client_config(
        &Trust::Ca(bundle.ca_pem),
        Some(&ClientCert {
            cert_pem: bundle.cert_pem,
            key_pem: bundle.key_pem,
        }),
    )
    .map_err(|e| CliError::NoIdentity(format!("identity {}: {e}", identity.value.display())))?;
    let ch = channel(&controller.value, config, Duration::from_secs(5))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(Client {
        api: OperatorServiceClient::new(ch),
        controller: controller.value.clone(),
    })
}

/// Maps a failed call to an error with a cause and a fix.
pub fn rpc_error(controller: &str, status: tonic::Status) -> CliError {
    use tonic::Code;
    let message = status.message().to_string();
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => CliError::PermissionDenied(message),
        Code::NotFound => CliError::NotFound(message),
        Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
            CliError::Invalid(message)
        }
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
            let cause = drover_identity::tls::describe_transport(&status);
            let lower = cause.to_ascii_lowercase();
            if lower.contains("certificate")
                || lower.contains("alert")
                || lower.contains("handshake")
            {
                CliError::PermissionDenied(format!(
                    "the TLS handshake with {controller} failed: {cause} (is the identity issued by this controller's CA and unexpired?)"
                ))
            } else {
                CliError::Unreachable(format!(
                    "cannot reach the controller at {controller}: {cause} (is drover-controller running? check --controller / DROVER_CONTROLLER)"
                ))
            }
        }
        _ => CliError::Other(format!("{:?}: {message}", status.code())),
    }
}
