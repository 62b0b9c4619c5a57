//! `drover operator create|list|revoke`: operator identities (admin or viewer certificates).

use std::path::PathBuf;

use clap::Subcommand;
use drover_identity::files::Bundle;
use drover_identity::pki::new_key_and_csr;
use drover_proto::v1;
use serde_json::{Value, json};

use super::Ctx;
use crate::CliError;
use crate::output;
use crate::render::{List, Render, line};

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Issue an operator identity; the key is made here and never sent.
    Create {
        name: String,
        #[arg(long, value_parser = ["admin", "viewer"])]
        role: String,
        /// Directory to write ca.pem, cert.pem and key.pem (0600) into.
        #[arg(long)]
        out: PathBuf,
    },
    /// List every operator certificate issued: name, role, serial, issued, expires, state.
    List,
    /// Refuse every certificate of operator NAME from now on, across restarts.
    Revoke { name: String },
}

/// What `drover operator revoke` did, with a warning when nothing of that name was recorded.
struct Revoked {
    name: String,
    certificates_revoked: u32,
}

impl Render for Revoked {
    fn text(&self, _now_ms: i64) -> String {
        line(format!(
            "operator {} revoked: {} recorded certificate(s), and any older one of that name, refused from now on",
            self.name, self.certificates_revoked
        ))
    }
    fn notes(&self, _now_ms: i64) -> String {
        if self.certificates_revoked > 0 {
            return String::new();
        }
        line(format!(
            "no certificate was recorded for {}: check the name with `drover operator list`",
            self.name
        ))
    }
    fn json(&self) -> Value {
        json!({
            "operator": self.name,
            "certificates_revoked": self.certificates_revoked,
        })
    }
}

/// `drover operator create`: the key and CSR made here, the certificate written next to them.
async fn create(ctx: &mut Ctx, name: String, role: String, out: PathBuf) -> Result<(), CliError> {
    if Bundle::exists(&out) {
        return Err(CliError::Invalid(format!(
            "{} already holds an identity; choose another --out directory",
            out.display()
        )));
    }
    let (key_pem, csr_pem) = new_key_and_csr(&name).map_err(|e| CliError::Other(e.to_string()))?;
    let resp = ctx
        .api
        .create_operator(v1::CreateOperatorRequest {
            name: name.clone(),
            role: role.clone(),
            csr_pem,
        })
        .await
        .map_err(ctx.err())?
        .into_inner();
    let expires = drover_identity::pki::CertInfo::from_pem(&resp.cert_pem)
        .map(|c| output::expires_in(c.not_after_unix, ctx.now))
        .unwrap_or_default();
    Bundle {
        ca_pem: resp.ca_pem,
        cert_pem: resp.cert_pem,
        key_pem,
    }
    .save(&out)
    .map_err(|e| CliError::Other(e.to_string()))?;
    ctx.say(&line(format!(
        "operator {name} ({role}) written to {}; the certificate expires {expires}",
        out.display()
    )))
}

pub async fn run(ctx: &mut Ctx, command: OperatorCommand) -> Result<(), CliError> {
    match command {
        OperatorCommand::Create { name, role, out } => create(ctx, name, role, out).await,
        OperatorCommand::List => {
            let operators = ctx
                .api
                .list_operators(v1::ListOperatorsRequest {})
                .await
                .map_err(ctx.err())?
                .into_inner()
                .operators;
            ctx.show(&List {
                items: &operators,
                json: output::operator_json,
                table: output::operators_table,
            })
        }
        OperatorCommand::Revoke { name } => {
            let resp = ctx
                .api
                .revoke_operator(v1::RevokeOperatorRequest { name: name.clone() })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Revoked {
                name,
                certificates_revoked: resp.certificates_revoked,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_an_unknown_operator_warns_on_stderr() {
        let none = Revoked {
            name: "bob".into(),
            certificates_revoked: 0,
        };
        assert!(
            none.notes(0).contains("check the name"),
            "{}",
            none.notes(0)
        );
        let some = Revoked {
            name: "bob".into(),
            certificates_revoked: 1,
        };
        assert_eq!(some.notes(0), "");
        assert_eq!(
            some.json(),
            json!({"operator": "bob", "certificates_revoked": 1})
        );
    }
}
