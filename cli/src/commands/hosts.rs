//! `drover hosts`, `drover status [HOST]`, `drover host revoke NAME` and `drover events HOST`:
//! the fleet's hosts, their health, and what they reported.

use clap::Subcommand;
use drover_proto::v1;
use serde_json::{Value, json};

use super::Ctx;
use crate::CliError;
use crate::output;
use crate::render::{List, Render, line};

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Close a host's session now and refuse its certificates from now on.
    Revoke { name: String },
}

/// `drover hosts`: every host with connection state and health.
pub async fn list(ctx: &mut Ctx) -> Result<(), CliError> {
    let hosts = ctx
        .api
        .list_hosts(v1::ListHostsRequest {})
        .await
        .map_err(ctx.err())?
        .into_inner()
        .hosts;
    ctx.show(&List {
        items: &hosts,
        json: output::host_json,
        table: output::hosts_table,
    })
}

/// `drover status HOST`: one host in detail.
struct Detail(v1::HostInfo);

impl Render for Detail {
    fn text(&self, now_ms: i64) -> String {
        line(output::host_detail(&self.0, now_ms))
    }
    fn json(&self) -> Value {
        output::host_json(&self.0)
    }
}

/// `drover status`: the controller, who we are to it, and every host.
struct Overview {
    controller: String,
    who: v1::WhoAmIResponse,
    hosts: Vec<v1::HostInfo>,
}

impl Render for Overview {
    fn text(&self, now_ms: i64) -> String {
        format!(
            "controller {} (you are {} / {})\n\n{}\n",
            self.controller,
            self.who.name,
            self.who.role,
            output::hosts_table(&self.hosts, now_ms)
        )
    }
    fn json(&self) -> Value {
        json!({
            "controller": self.controller,
            "operator": {"name": self.who.name, "role": self.who.role},
            "hosts": self.hosts.iter().map(output::host_json).collect::<Vec<_>>(),
        })
    }
}

/// `drover status [HOST]`: one host in detail, or the overview without HOST.
pub async fn status(ctx: &mut Ctx, host: Option<String>) -> Result<(), CliError> {
    if let Some(name) = host {
        let host = ctx
            .api
            .get_host(v1::GetHostRequest { name })
            .await
            .map_err(ctx.err())?
            .into_inner();
        return ctx.show(&Detail(host));
    }
    let who = ctx
        .api
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .map_err(ctx.err())?
        .into_inner();
    let hosts = ctx
        .api
        .list_hosts(v1::ListHostsRequest {})
        .await
        .map_err(ctx.err())?
        .into_inner()
        .hosts;
    ctx.show(&Overview {
        controller: ctx.addr.clone(),
        who,
        hosts,
    })
}

/// `drover host revoke NAME`: what the revocation did.
struct Revoked {
    name: String,
    resp: v1::RevokeHostResponse,
}

impl Render for Revoked {
    fn text(&self, _now_ms: i64) -> String {
        line(format!(
            "host {} revoked: {} certificate(s) refused from now on{}",
            self.name,
            self.resp.certificates_revoked,
            if self.resp.session_closed {
                ", session closed"
            } else {
                ""
            }
        ))
    }
    fn json(&self) -> Value {
        json!({
            "host": self.name,
            "certificates_revoked": self.resp.certificates_revoked,
            "session_closed": self.resp.session_closed,
        })
    }
}

pub async fn run(ctx: &mut Ctx, command: HostCommand) -> Result<(), CliError> {
    match command {
        HostCommand::Revoke { name } => {
            let resp = ctx
                .api
                .revoke_host(v1::RevokeHostRequest { name: name.clone() })
                .await
                .map_err(ctx.err())?
                .into_inner();
            ctx.show(&Revoked { name, resp })
        }
    }
}

/// `drover events HOST`: one line per event, oldest first (nothing at all when there are none).
struct Events(Vec<v1::JobEvent>);

impl Render for Events {
    fn text(&self, _now_ms: i64) -> String {
        self.0
            .iter()
            .map(|e| {
                line(format!(
                    "{:>6}  {}  {}  {}  {}",
                    e.seq,
                    output::rfc3339_ms(e.at_unix_ms).as_str().unwrap_or("-"),
                    e.job_id,
                    e.kind,
                    e.message
                ))
            })
            .collect()
    }
    fn json(&self) -> Value {
        Value::Array(self.0.iter().map(output::event_json).collect())
    }
}

/// `drover events HOST`: job events the host has reported, after sequence number `after`.
pub async fn events(ctx: &mut Ctx, host: String, after: u64, limit: u32) -> Result<(), CliError> {
    let events = ctx
        .api
        .list_events(v1::ListEventsRequest {
            host,
            after_seq: after,
            limit,
        })
        .await
        .map_err(ctx.err())?
        .into_inner()
        .events;
    ctx.show(&Events(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_line_each_and_nothing_when_there_are_none() {
        assert_eq!(Events(vec![]).text(0), "");
        let e = v1::JobEvent {
            seq: 7,
            job_id: "deploy-1".into(),
            at_unix_ms: 1_700_000_000_000,
            kind: "job.started".into(),
            message: "deploy api v1".into(),
            ..Default::default()
        };
        assert_eq!(
            Events(vec![e]).text(0),
            "     7  2023-11-14T22:13:20Z  deploy-1  job.started  deploy api v1\n"
        );
    }

    #[test]
    fn a_revoked_host_says_whether_its_session_closed() {
        let r = Revoked {
            name: "web-1".into(),
            resp: v1::RevokeHostResponse {
                certificates_revoked: 2,
                session_closed: true,
            },
        };
        assert_eq!(
            r.text(0),
            "host web-1 revoked: 2 certificate(s) refused from now on, session closed\n"
        );
        assert_eq!(
            r.json(),
            json!({"host": "web-1", "certificates_revoked": 2, "session_closed": true})
        );
    }
}
