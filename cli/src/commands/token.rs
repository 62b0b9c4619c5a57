//! `drover token create|list|revoke`: one-time enrollment tokens for new hosts.

use std::collections::BTreeMap;

use clap::Subcommand;
use drover_proto::v1;
use serde_json::{Value, json};

use super::{Ctx, parse_label};
use crate::CliError;
use crate::output;
use crate::render::{List, Render, line};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a one-time enrollment token bound to a host name.
    Create {
        #[arg(long)]
        host: String,
        /// Label for the host, k=v (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Lifetime (e.g. 15m, 2h; at least 1m, at most 168h); default from the controller's
        /// config.
        #[arg(long, value_parser = drover_model::units::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List enrollment tokens (never their secrets).
    List,
    /// Revoke an unused token by id.
    Revoke { id: String },
}

/// A new token: the secret alone on stdout (so it can be captured), what it is for on stderr.
struct Created {
    host: String,
    controller: String,
    resp: v1::CreateTokenResponse,
}

impl Render for Created {
    fn text(&self, _now_ms: i64) -> String {
        line(&self.resp.token)
    }
    fn notes(&self, now_ms: i64) -> String {
        line(format!(
            "token {} for host {}, works once, expires {}.\non the host: drover-agent enroll --controller {} --token <the line above>",
            self.resp.id,
            self.host,
            output::expires_in(self.resp.expires_unix_ms / 1000, now_ms),
            self.controller
        ))
    }
    fn json(&self) -> Value {
        json!({
            "token": self.resp.token,
            "id": self.resp.id,
            "host": self.host,
            "expires_at": output::rfc3339_ms(self.resp.expires_unix_ms),
        })
    }
}

pub async fn run(ctx: &mut Ctx, command: TokenCommand) -> Result<(), CliError> {
    match command {
        TokenCommand::Create { host, labels, ttl } => {
            // 0 on the wire means "the controller's default": a zero (or sub-second) --ttl
            // would silently become that, so it is refused here; the controller checks the
            // bounds of any other value.
            if ttl.is_some_and(|d| d.as_secs() == 0) {
                return Err(CliError::Invalid(
                    "--ttl must be at least 1m (and at most 168h): a token that expires at once cannot be used".into(),
                ));
            }
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let resp = ctx
                .api
                .create_token(v1::CreateTokenRequest {
                    host: host.clone(),
                    labels: labels.into_iter().collect(),
                    ttl_secs: ttl.map(|d| d.as_secs()).unwrap_or(0),
                })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Created {
                host,
                controller: ctx.addr.clone(),
                resp,
            })
        }
        TokenCommand::List => {
            let tokens = ctx
                .api
                .list_tokens(v1::ListTokensRequest {})
                .await
                .map_err(ctx.err())?
                .into_inner()
                .tokens;
            ctx.show(&List {
                items: &tokens,
                json: output::token_json,
                table: output::tokens_table,
            })
        }
        TokenCommand::Revoke { id } => {
            ctx.api
                .revoke_token(v1::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(ctx.err())?;
            ctx.say(&line(format!("token {id} revoked")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_token_is_alone_on_stdout() {
        let now = 1_000_000_000;
        let c = Created {
            host: "web-1".into(),
            controller: "ctl:7443".into(),
            resp: v1::CreateTokenResponse {
                token: "drover-token-xyz".into(),
                id: "t1".into(),
                expires_unix_ms: now + 15 * 60 * 1000,
            },
        };
        assert_eq!(c.text(now), "drover-token-xyz\n");
        assert_eq!(
            c.notes(now),
            "token t1 for host web-1, works once, expires in 15m.\non the host: drover-agent enroll --controller ctl:7443 --token <the line above>\n"
        );
        assert_eq!(c.json()["token"], "drover-token-xyz");
        assert_eq!(c.json()["host"], "web-1");
    }
}
