//! `drover whoami`: who this identity is to the controller, and where both are.

use std::path::PathBuf;

use drover_proto::v1;
use serde_json::{Value, json};

use super::Ctx;
use crate::CliError;
use crate::render::{Render, line};

struct Who {
    who: v1::WhoAmIResponse,
    controller: String,
    identity: PathBuf,
}

impl Render for Who {
    fn text(&self, _now_ms: i64) -> String {
        line(format!(
            "{} ({}) at {}, identity {}",
            self.who.name,
            self.who.role,
            self.controller,
            self.identity.display()
        ))
    }
    fn json(&self) -> Value {
        json!({
            "name": self.who.name,
            "role": self.who.role,
            "controller": self.controller,
            "identity": self.identity,
        })
    }
}

pub async fn run(ctx: &mut Ctx) -> Result<(), CliError> {
    let who = ctx
        .api
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map_err(ctx.err())?
        .into_inner();
    ctx.show(&Who {
        who,
        controller: ctx.addr.clone(),
        identity: ctx.identity.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whoami_names_the_controller_and_the_identity() {
        let w = Who {
            who: v1::WhoAmIResponse {
                name: "alice".into(),
                role: "admin".into(),
            },
            controller: "ctl:7443".into(),
            identity: PathBuf::from("/id/alice"),
        };
        assert_eq!(w.text(0), "alice (admin) at ctl:7443, identity /id/alice\n");
        assert_eq!(
            w.json(),
            json!({"name": "alice", "role": "admin", "controller": "ctl:7443", "identity": "/id/alice"})
        );
    }
}
