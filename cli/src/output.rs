//! The tables and JSON of each record `drover` shows, pure functions of the data; each
//! command's [`Render`](crate::render::Render) puts them together.

use std::time::Duration;

use comfy_table::{Table, presets::NOTHING};
use drover_proto::v1;
use serde_json::{Value, json};

pub use drover_model::units::ago;

/// RFC 3339 time, or null for "never".
pub fn rfc3339_ms(ms: i64) -> Value {
    if ms <= 0 {
        return Value::Null;
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
    Value::String(humantime::format_rfc3339_seconds(t).to_string())
}

fn rfc3339_secs(secs: i64) -> Value {
    rfc3339_ms(secs.saturating_mul(1000))
}

/// "in 23h", "expired 2h ago".
pub fn expires_in(unix_secs: i64, now_ms: i64) -> String {
    if unix_secs <= 0 {
        return "-".into();
    }
    let left = unix_secs - now_ms / 1000;
    if left < 0 {
        return format!("expired {}", ago(unix_secs * 1000, now_ms));
    }
    match left {
        0..=119 => format!("in {left}s"),
        120..=7199 => format!("in {}m", left / 60),
        7200..=172_799 => format!("in {}h", left / 3600),
        _ => format!("in {}d", left / 86_400),
    }
}

fn failing_checks(report: Option<&v1::HealthReport>) -> Vec<&v1::Check> {
    report
        .map(|r| {
            r.checks
                .iter()
                .filter(|c| c.status != v1::CheckStatus::Healthy as i32)
                .collect()
        })
        .unwrap_or_default()
}

pub fn host_json(h: &v1::HostInfo) -> Value {
    let checks: Vec<Value> = h
        .last_report
        .as_ref()
        .map(|r| {
            r.checks
                .iter()
                .map(|c| json!({"name": c.name, "status": status_name(c.status), "reason": c.reason}))
                .collect()
        })
        .unwrap_or_default();
    let report = h.last_report.as_ref();
    json!({
        "name": h.name,
        "state": h.state,
        "health": h.health,
        "last_seen": rfc3339_ms(h.last_seen_unix_ms),
        "last_seen_unix_ms": h.last_seen_unix_ms,
        "session_open": h.session_open,
        "agent_version": h.agent_version,
        "cert_not_after": rfc3339_secs(h.cert_not_after_unix),
        "labels": h.labels,
        "enrolled_at": rfc3339_ms(h.enrolled_unix_ms),
        "events_stored": h.acked_seq,
        "behind": h.behind.iter().map(|b| json!({
            "app": b.app,
            "release": b.release_id,
            "desired_version": b.desired_version,
            "live_version": b.live_version,
        })).collect::<Vec<_>>(),
        "checks": checks,
        "docker": report.map(|r| json!({
            "reachable": r.docker_reachable,
            "version": r.docker_version,
            "containers_running": r.containers_running,
            "containers_total": r.containers_total,
        })),
        "load": report.map(|r| json!([r.load1, r.load5, r.load15])),
        "memory": report.map(|r| json!({"total_bytes": r.mem_total_bytes, "available_bytes": r.mem_available_bytes})),
        "disks": report.map(|r| r.disks.iter().map(|d| json!({"mount": d.mount, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes})).collect::<Vec<_>>()),
        "uptime_secs": report.map(|r| r.uptime_secs),
        "clock_offset_ms": report.map(|r| r.clock_offset_ms),
        "apps": report.map(|r| r.apps.iter().map(|a| json!({
            "app": a.app,
            "version": a.version,
            "running": a.running,
            "listen": a.listen,
            "requests": a.requests,
            "status_5xx": a.status_5xx,
            "p95_ms": a.p95_ms,
        })).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.iter().map(|h| h.to_string()));
    t
}

pub fn hosts_table(hosts: &[v1::HostInfo], now_ms: i64) -> String {
    if hosts.is_empty() {
        return "no hosts enrolled yet: `drover token create --host NAME`, then `drover-agent enroll` on the host".into();
    }
    let mut t = table(&[
        "NAME",
        "STATE",
        "HEALTH",
        "LAST SEEN",
        "VERSION",
        "CERT EXPIRES",
        "FAILING CHECKS",
    ]);
    for h in hosts {
        let failing = failing_checks(h.last_report.as_ref())
            .iter()
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
            .join(",");
        t.add_row(vec![
            h.name.clone(),
            h.state.clone(),
            h.health.clone(),
            ago(h.last_seen_unix_ms, now_ms),
            h.agent_version.clone(),
            expires_in(h.cert_not_after_unix, now_ms),
            if failing.is_empty() {
                "-".into()
            } else {
                failing
            },
        ]);
    }
    let mut out = t.to_string();
    for h in hosts {
        for b in &h.behind {
            out.push_str(&format!("\n{} is behind: {}", h.name, behind_text(b)));
        }
    }
    out
}

/// One app a host is behind on, for people.
pub fn behind_text(b: &v1::BehindRelease) -> String {
    let live = if b.live_version.is_empty() {
        "nothing"
    } else {
        &b.live_version
    };
    format!(
        "{} runs {live}, release {} put {} (`drover release converge {}`)",
        b.app, b.release_id, b.desired_version, b.release_id
    )
}

pub fn host_detail(h: &v1::HostInfo, now_ms: i64) -> String {
    let mut out = String::new();
    for b in &h.behind {
        out.push_str(&format!("behind:        {}\n", behind_text(b)));
    }
    let labels = h
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    out.push_str(&format!("host:          {}\n", h.name));
    out.push_str(&format!(
        "state:         {}{}\n",
        h.state,
        if h.session_open {
            " (session open)"
        } else {
            ""
        }
    ));
    out.push_str(&format!("health:        {}\n", h.health));
    out.push_str(&format!(
        "last seen:     {}\n",
        ago(h.last_seen_unix_ms, now_ms)
    ));
    out.push_str(&format!(
        "agent version: {}\n",
        if h.agent_version.is_empty() {
            "-"
        } else {
            &h.agent_version
        }
    ));
    out.push_str(&format!(
        "certificate:   expires {}\n",
        expires_in(h.cert_not_after_unix, now_ms)
    ));
    out.push_str(&format!(
        "labels:        {}\n",
        if labels.is_empty() {
            "-".into()
        } else {
            labels
        }
    ));
    if let Some(r) = &h.last_report {
        out.push_str(&format!(
            "docker:        {}\n",
            if r.docker_reachable {
                format!(
                    "{} ({} running / {} containers)",
                    r.docker_version, r.containers_running, r.containers_total
                )
            } else {
                "unreachable".into()
            }
        ));
        out.push_str(&format!(
            "load:          {:.2} {:.2} {:.2}\n",
            r.load1, r.load5, r.load15
        ));
        out.push_str(&format!("clock offset:  {} ms\n", r.clock_offset_ms));
        if r.apps.is_empty() {
            out.push_str("apps:          none live\n");
        } else {
            out.push_str("apps:\n");
            let mut t = table(&[
                "  APP", "VERSION", "RUNNING", "LISTEN", "REQUESTS", "5XX", "P95",
            ]);
            for a in &r.apps {
                t.add_row(vec![
                    format!("  {}", a.app),
                    a.version.clone(),
                    if a.running { "yes" } else { "NO" }.to_string(),
                    if a.listen.is_empty() {
                        "-".into()
                    } else {
                        a.listen.clone()
                    },
                    a.requests.to_string(),
                    a.status_5xx.to_string(),
                    format!("{} ms", a.p95_ms),
                ]);
            }
            out.push_str(&t.to_string());
            out.push('\n');
        }
        out.push_str("checks:\n");
        let mut t = table(&["  CHECK", "STATUS", "REASON"]);
        for c in &r.checks {
            t.add_row(vec![
                format!("  {}", c.name),
                status_name(c.status).to_string(),
                c.reason.clone(),
            ]);
        }
        out.push_str(&t.to_string());
    } else {
        out.push_str("checks:        no health report received yet");
    }
    out
}

pub fn token_json(t: &v1::TokenInfo) -> Value {
    json!({
        "id": t.id,
        "host": t.host,
        "labels": t.labels,
        "state": t.state,
        "created_at": rfc3339_ms(t.created_unix_ms),
        "expires_at": rfc3339_ms(t.expires_unix_ms),
        "created_by": t.created_by,
    })
}

pub fn tokens_table(tokens: &[v1::TokenInfo], now_ms: i64) -> String {
    if tokens.is_empty() {
        return "no enrollment tokens".into();
    }
    let mut t = table(&["ID", "HOST", "STATE", "CREATED", "EXPIRES", "BY"]);
    for tok in tokens {
        t.add_row(vec![
            tok.id.clone(),
            tok.host.clone(),
            tok.state.clone(),
            ago(tok.created_unix_ms, now_ms),
            expires_in(tok.expires_unix_ms / 1000, now_ms),
            tok.created_by.clone(),
        ]);
    }
    t.to_string()
}

/// What an app's spec allows beyond a plain container (host mounts, host network), from its
/// stored TOML; empty for a spec that does not parse here.
pub fn app_privileges(a: &v1::AppInfo) -> Vec<String> {
    drover_model::appspec::AppSpec::from_toml(&a.spec_toml, &a.name)
        .map(|spec| spec.privileges())
        .unwrap_or_default()
}

pub fn operator_json(o: &v1::OperatorInfo) -> Value {
    json!({
        "name": o.name,
        "role": o.role,
        "serial": o.serial,
        "state": o.state,
        "issued_at": rfc3339_ms(o.issued_unix_ms),
        "expires_at": rfc3339_ms(o.expires_unix_ms),
        "revoked_at": rfc3339_ms(o.revoked_unix_ms),
        "created_by": o.created_by,
    })
}

pub fn operators_table(operators: &[v1::OperatorInfo], now_ms: i64) -> String {
    if operators.is_empty() {
        return "no operator certificates recorded".into();
    }
    let mut t = table(&["NAME", "ROLE", "STATE", "SERIAL", "ISSUED", "EXPIRES", "BY"]);
    for o in operators {
        t.add_row(vec![
            o.name.clone(),
            o.role.clone(),
            o.state.clone(),
            o.serial.chars().take(16).collect(),
            ago(o.issued_unix_ms, now_ms),
            expires_in(o.expires_unix_ms / 1000, now_ms),
            o.created_by.clone(),
        ]);
    }
    t.to_string()
}

pub fn app_json(a: &v1::AppInfo) -> Value {
    json!({
        "privileges": app_privileges(a),
        "name": a.name,
        "revision": a.revision,
        "image": a.image,
        "web": a.has_web,
        "workers": a.workers,
        "updated_at": rfc3339_ms(a.updated_unix_ms),
        "updated_by": a.updated_by,
        "spec_toml": a.spec_toml,
    })
}

pub fn apps_table(apps: &[v1::AppInfo], now_ms: i64) -> String {
    if apps.is_empty() {
        return "no apps yet: `drover app apply FILE` (see examples/api.toml)".into();
    }
    let mut t = table(&["NAME", "REVISION", "IMAGE", "ROLES", "APPLIED", "BY"]);
    for a in apps {
        let mut roles: Vec<String> = Vec::new();
        if a.has_web {
            roles.push("web".into());
        }
        roles.extend(a.workers.iter().cloned());
        t.add_row(vec![
            a.name.clone(),
            a.revision.to_string(),
            a.image.clone(),
            roles.join(","),
            ago(a.updated_unix_ms, now_ms),
            a.updated_by.clone(),
        ]);
    }
    t.to_string()
}

/// An event as JSON; a record it carries is `payload`, in `drover-model`'s form (for example
/// `{"releases": {"app": ..., "releases": [...]}}`), and absent when it carries none.
pub fn event_json(e: &v1::JobEvent) -> Value {
    let mut v = json!({
        "host": e.host,
        "seq": e.seq,
        "job_id": e.job_id,
        "at": rfc3339_ms(e.at_unix_ms),
        "kind": e.kind,
        "message": e.message,
        "fields": e.fields,
    });
    if let Some(wire) = &e.payload {
        v["payload"] = match drover_proto::payload::from_proto(wire.clone()) {
            Ok(payload) => serde_json::to_value(payload).unwrap_or(Value::Null),
            Err(err) => json!({ "unreadable": err.to_string() }),
        };
    }
    v
}

/// "850ms", "12.5s", "2m05s", "1h02m".
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{}.{}s", ms / 1000, (ms % 1000) / 100),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms % 60_000) / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms % 3_600_000) / 60_000),
    }
}

fn job_duration_ms(j: &v1::JobInfo, now_ms: i64) -> i64 {
    let end = if j.finished_unix_ms > 0 {
        j.finished_unix_ms
    } else {
        now_ms
    };
    end - j.created_unix_ms
}

pub fn job_json(j: &v1::JobInfo) -> Value {
    json!({
        "warnings": j.warnings,
        "id": j.id,
        "kind": j.kind,
        "app": j.app,
        "version": j.version,
        "requested_by": j.requested_by,
        "created_at": rfc3339_ms(j.created_unix_ms),
        "finished_at": rfc3339_ms(j.finished_unix_ms),
        "duration_ms": (j.finished_unix_ms > 0).then(|| j.finished_unix_ms - j.created_unix_ms),
        "state": j.state,
        "cancel_requested_by": j.cancel_requested_by,
        "cancel_requested_at": rfc3339_ms(j.cancel_requested_unix_ms),
        "targets": j.targets.iter().map(|t| json!({
            "host": t.host,
            "state": t.state,
            "step": t.step,
            "message": t.message,
            "started_at": rfc3339_ms(t.started_unix_ms),
            "finished_at": rfc3339_ms(t.finished_unix_ms),
            "logs": t.logs,
            "code": t.code,
        })).collect::<Vec<_>>(),
    })
}

/// `drover cancel --json`: the job as stored after the request, and whom it reached.
pub fn cancel_json(c: &v1::CancelJobResponse) -> Value {
    json!({
        "job": c.job.as_ref().map(job_json),
        "already_finished": c.already_finished,
        "hosts_told": c.hosts_told,
        "hosts_pending": c.hosts_pending,
    })
}

/// `drover cancel`: one line saying what the request did.
pub fn cancel_text(c: &v1::CancelJobResponse) -> String {
    let (id, state) = c
        .job
        .as_ref()
        .map(|j| (j.id.as_str(), j.state.as_str()))
        .unwrap_or(("?", "?"));
    if c.already_finished {
        return format!("job {id} already finished ({state}); nothing to cancel");
    }
    let mut out = format!("cancel of job {id} requested");
    if !c.hosts_told.is_empty() {
        out.push_str(&format!(
            "; {} stop(s) at the next safe point",
            c.hosts_told.join(", ")
        ));
    }
    if !c.hosts_pending.is_empty() {
        out.push_str(&format!(
            "; {} not connected: told when it reconnects",
            c.hosts_pending.join(", ")
        ));
    }
    if state == "cancelled" {
        out.push_str("; the job is cancelled");
    } else {
        out.push_str(&format!("; `drover watch {id}` follows it to the end"));
    }
    out
}

pub fn jobs_table(jobs: &[v1::JobInfo], now_ms: i64) -> String {
    if jobs.is_empty() {
        return "no jobs yet: `drover deploy APP VERSION` starts one".into();
    }
    let mut t = table(&[
        "ID", "KIND", "APP", "VERSION", "BY", "CREATED", "DURATION", "STATE", "HOSTS",
    ]);
    for j in jobs {
        t.add_row(vec![
            j.id.clone(),
            j.kind.clone(),
            j.app.clone(),
            if j.version.is_empty() {
                "(previous)".into()
            } else {
                j.version.clone()
            },
            j.requested_by.clone(),
            ago(j.created_unix_ms, now_ms),
            duration_ms(job_duration_ms(j, now_ms)),
            j.state.clone(),
            j.targets
                .iter()
                .map(|t| t.host.as_str())
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    t.to_string()
}

/// The image ID without its algorithm, cut to 12 hex digits, as `docker images` shows it.
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

pub fn release_json(r: &v1::ReleaseInfo) -> Value {
    json!({
        "app": r.app,
        "host": r.host,
        "id": r.id,
        "version": r.version,
        "image": r.image,
        "digest": r.digest,
        "deployed_by": r.deployed_by,
        "job_id": r.job_id,
        "started_at": rfc3339_ms(r.started_unix_ms),
        "finished_at": rfc3339_ms(r.finished_unix_ms),
        "result": r.result,
        "state": r.state,
        "live": r.live,
        "rollback_target": r.rollback_target,
    })
}

pub fn releases_table(releases: &[v1::ReleaseInfo], app: &str, now_ms: i64) -> String {
    if releases.is_empty() {
        return format!("no releases of {app} reported yet: `drover deploy {app} VERSION`");
    }
    let mut t = table(&[
        "HOST", "VERSION", "DIGEST", "BY", "DEPLOYED", "DURATION", "RESULT", "STATE", "",
    ]);
    for r in releases {
        let mark = if r.live {
            "LIVE"
        } else if r.rollback_target {
            "<- rollback target"
        } else {
            ""
        };
        let took = if r.finished_unix_ms > 0 {
            duration_ms(r.finished_unix_ms - r.started_unix_ms)
        } else {
            "-".into()
        };
        t.add_row(vec![
            r.host.clone(),
            r.version.clone(),
            short_digest(&r.digest),
            r.deployed_by.clone(),
            ago(r.started_unix_ms, now_ms),
            took,
            r.result.clone(),
            r.state.clone(),
            mark.to_string(),
        ]);
    }
    t.to_string()
}

pub fn target_json(t: &v1::BackupTargetInfo) -> Value {
    json!({
        "name": t.name,
        "revision": t.revision,
        "kind": t.kind,
        "host": t.host,
        "remote": t.remote,
        "encrypted": t.encrypted,
        "updated_at": rfc3339_ms(t.updated_unix_ms),
        "updated_by": t.updated_by,
        "target_toml": t.target_toml,
    })
}

pub fn targets_table(targets: &[v1::BackupTargetInfo], now_ms: i64) -> String {
    if targets.is_empty() {
        return "no backup targets yet: `drover backup-target apply FILE` (see examples/backup-postgres.toml)".into();
    }
    let mut t = table(&[
        "NAME",
        "KIND",
        "HOST",
        "S3",
        "ENCRYPTED",
        "REVISION",
        "APPLIED",
    ]);
    for x in targets {
        t.add_row(vec![
            x.name.clone(),
            x.kind.clone(),
            or_dash(&x.host),
            yes_no(x.remote),
            yes_no(x.encrypted),
            x.revision.to_string(),
            ago(x.updated_unix_ms, now_ms),
        ]);
    }
    t.to_string()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn yes_no(b: bool) -> String {
    if b { "yes".into() } else { "no".into() }
}

/// Bytes for a person: `512 B`, `3.4 MiB`.
pub fn bytes(n: u64) -> String {
    drover_model::units::human_bytes(n)
}

/// Where the copies are: `local+s3`, `local`, `s3`; a local copy known corrupt shows as
/// `local (corrupt)`.
fn stored_where(b: &v1::BackupInfo) -> String {
    let local = if b.local_corrupt.is_empty() {
        "local"
    } else {
        "local (corrupt)"
    };
    match (b.local_dir.is_empty(), b.remote.is_empty()) {
        (false, false) => format!("{local}+s3"),
        (false, true) => local.into(),
        (true, false) => "s3".into(),
        (true, true) => "-".into(),
    }
}

/// The VERIFIED column: when the copies last matched the manifest, never for a backup whose
/// local copy is known corrupt.
fn verified_cell(b: &v1::BackupInfo, now_ms: i64, never: &str) -> String {
    if !b.local_corrupt.is_empty() {
        "no (local corrupt)".into()
    } else if b.verified_unix_ms > 0 {
        ago(b.verified_unix_ms, now_ms)
    } else {
        never.into()
    }
}

/// The first part's hash, cut like a digest (the manifest has them all).
fn first_hash(b: &v1::BackupInfo) -> String {
    serde_json::from_str::<Value>(&b.manifest_json)
        .ok()
        .and_then(|m| {
            m["parts"][0]["sha256"]
                .as_str()
                .map(|h| h.chars().take(12).collect())
        })
        .unwrap_or_else(|| "-".into())
}

pub fn backup_json(b: &v1::BackupInfo) -> Value {
    json!({
        "id": b.id,
        "target": b.target,
        "host": b.host,
        "kind": b.kind,
        "trigger": b.trigger,
        "job_id": b.job_id,
        "requested_by": b.requested_by,
        "started_at": rfc3339_ms(b.started_unix_ms),
        "finished_at": rfc3339_ms(b.finished_unix_ms),
        "size_bytes": b.size_bytes,
        "source_bytes": b.source_bytes,
        "ratio": b.ratio,
        "local_dir": b.local_dir,
        "remote": b.remote,
        "verified_at": if b.verified_unix_ms > 0 && b.local_corrupt.is_empty() { rfc3339_ms(b.verified_unix_ms) } else { Value::Null },
        "local_corrupt": if b.local_corrupt.is_empty() { Value::Null } else { Value::from(b.local_corrupt.clone()) },
        "encrypted": b.encrypted,
        "release": b.release,
        "manifest": serde_json::from_str::<Value>(&b.manifest_json).unwrap_or(Value::Null),
    })
}

pub fn backups_table(backups: &[v1::BackupInfo], now_ms: i64) -> String {
    if backups.is_empty() {
        return "no backups reported yet: `drover backup run TARGET`".into();
    }
    let mut t = table(&[
        "ID", "HOST", "TAKEN", "SIZE", "RATIO", "SHA256", "STORED", "VERIFIED", "TRIGGER",
    ]);
    for b in backups {
        t.add_row(vec![
            b.id.clone(),
            b.host.clone(),
            ago(b.started_unix_ms, now_ms),
            bytes(b.size_bytes),
            format!("{:.1}x", b.ratio),
            first_hash(b),
            stored_where(b),
            verified_cell(b, now_ms, "no"),
            b.trigger.clone(),
        ]);
    }
    t.to_string()
}

pub fn backup_detail(b: &v1::BackupInfo, now_ms: i64) -> String {
    let mut out = format!(
        "backup {} of {} on {} ({} {}, by {})\ntaken {} in {}\nsize {} from {} ({:.1}x){}\nlocal {}\nremote {}\nverified {}\n",
        b.id,
        b.target,
        b.host,
        b.kind,
        b.trigger,
        or_dash(&b.requested_by),
        ago(b.started_unix_ms, now_ms),
        duration_ms(b.finished_unix_ms - b.started_unix_ms),
        bytes(b.size_bytes),
        bytes(b.source_bytes),
        b.ratio,
        if b.encrypted { ", encrypted" } else { "" },
        if b.local_corrupt.is_empty() {
            or_dash(&b.local_dir)
        } else {
            format!("{} ({})", b.local_dir, b.local_corrupt)
        },
        or_dash(&b.remote),
        verified_cell(b, now_ms, "never"),
    );
    if !b.release.is_empty() {
        out.push_str(&format!("release {}\n", b.release));
    }
    if let Ok(manifest) = serde_json::from_str::<Value>(&b.manifest_json) {
        for part in manifest["parts"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "part {} {} {} sha256 {}\n",
                part["name"].as_str().unwrap_or("-"),
                part["file"].as_str().unwrap_or("-"),
                bytes(part["size"].as_u64().unwrap_or(0)),
                part["sha256"].as_str().unwrap_or("-"),
            ));
            if let Some(v) = part["server_version"].as_str().filter(|v| !v.is_empty()) {
                out.push_str(&format!(
                    "  server {v}, {}\n",
                    part["pg_dump_version"].as_str().unwrap_or("-")
                ));
            }
            for table in part["tables"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  {}.{} ~{} rows\n",
                    table["schema"].as_str().unwrap_or("-"),
                    table["name"].as_str().unwrap_or("-"),
                    table["rows"].as_i64().unwrap_or(0)
                ));
            }
        }
    }
    out
}

/// `drover backup prune --dry-run --json`: the plan, from the controller's catalog.
pub fn prune_plan_json(p: &v1::PlanPruneResponse) -> Value {
    json!({
        "target": p.target,
        "dry_run": true,
        "source": "controller catalog",
        "local_policy": p.local_policy,
        "remote_policy": p.remote_policy,
        "would_delete": p.lines.iter().filter(|l| !l.keep).count(),
        "lines": p.lines.iter().map(|l| json!({
            "host": l.host,
            "id": l.id,
            "copy": l.copy,
            "keep": l.keep,
            "reasons": l.reasons,
            "started_at": rfc3339_ms(l.started_unix_ms),
            "size_bytes": l.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// `drover backup prune --dry-run`: the rules, each copy kept (and by which rule) or deleted,
/// and a last line saying what would go.
pub fn prune_plan_text(p: &v1::PlanPruneResponse, now_ms: i64) -> String {
    let mut out = format!(
        "dry run of {}'s retention, from the controller's catalog (nothing is changed)
local copies: {}
remote copies: {}
",
        p.target, p.local_policy, p.remote_policy
    );
    if p.lines.is_empty() {
        out.push_str(&format!(
            "no backups of {} in the controller's catalog: nothing to delete",
            p.target
        ));
        return out;
    }
    let mut t = table(&["ACTION", "HOST", "COPY", "ID", "TAKEN", "SIZE", "WHY"]);
    for l in &p.lines {
        t.add_row(vec![
            if l.keep { "keep" } else { "delete" }.to_string(),
            l.host.clone(),
            l.copy.clone(),
            l.id.clone(),
            ago(l.started_unix_ms, now_ms),
            bytes(l.size_bytes),
            if l.keep {
                l.reasons.join(", ")
            } else {
                "no rule keeps it".to_string()
            },
        ]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
    let gone: Vec<String> = p
        .lines
        .iter()
        .filter(|l| !l.keep)
        .map(|l| format!("{} ({} on {})", l.id, l.copy, l.host))
        .collect();
    if gone.is_empty() {
        out.push_str("nothing to delete");
    } else {
        out.push_str(&format!("would delete {}", gone.join(", ")));
    }
    out
}

pub fn verification_json(v: &v1::VerificationInfo) -> Value {
    json!({
        "job_id": v.job_id,
        "target": v.target,
        "host": v.host,
        "backup_id": v.backup_id,
        "started_at": rfc3339_ms(v.started_unix_ms),
        "finished_at": rfc3339_ms(v.finished_unix_ms),
        "passed": v.passed,
        "copy": v.copy,
        "local_corrupt": if v.local_corrupt.is_empty() { Value::Null } else { Value::from(v.local_corrupt.clone()) },
        "failed_checks": v.checks.iter().filter(|c| c.result == "failed").map(|c| c.name.clone()).collect::<Vec<_>>(),
        "checks": v.checks.iter().map(|c| json!({
            "name": c.name,
            "result": c.result,
            "message": c.message,
            "duration_ms": c.duration_ms,
            "evidence": c.evidence,
        })).collect::<Vec<_>>(),
    })
}

pub fn verifications_table(found: &[v1::VerificationInfo], now_ms: i64) -> String {
    if found.is_empty() {
        return "no validations yet: `drover verify TARGET`".into();
    }
    let mut t = table(&[
        "WHEN", "TARGET", "HOST", "BACKUP", "RESULT", "FAILED", "TOOK", "CHECKS",
    ]);
    for v in found {
        let failed: Vec<&str> = v
            .checks
            .iter()
            .filter(|c| c.result == "failed")
            .map(|c| c.name.as_str())
            .collect();
        let durations: Vec<String> = v
            .checks
            .iter()
            .filter(|c| c.result != "skipped")
            .map(|c| format!("{} {}", c.name, duration_ms(c.duration_ms)))
            .collect();
        t.add_row(vec![
            ago(v.finished_unix_ms, now_ms),
            v.target.clone(),
            v.host.clone(),
            if v.backup_id.is_empty() {
                "-".into()
            } else {
                v.backup_id.clone()
            },
            if v.passed {
                "passed".into()
            } else {
                "FAILED".into()
            },
            if failed.is_empty() {
                "-".into()
            } else {
                failed.join(", ")
            },
            duration_ms(v.finished_unix_ms - v.started_unix_ms),
            durations.join(", "),
        ]);
    }
    t.to_string()
}

/// A future (or past) time as RFC 3339 UTC with "in 5h" (or "3m ago").
pub fn when(ms: i64, now_ms: i64) -> String {
    let at = rfc3339_ms(ms);
    let at = at.as_str().unwrap_or("-");
    if ms >= now_ms {
        format!("{at} (in {})", duration_ms(ms - now_ms))
    } else {
        format!("{at} ({})", ago(ms, now_ms))
    }
}

pub fn schedule_json(s: &v1::ScheduleInfo) -> Value {
    json!({
        "id": s.id,
        "kind": s.kind,
        "target": s.target,
        "version": s.version,
        "hosts": s.hosts,
        "cron": s.cron,
        "at": rfc3339_ms(s.at_unix_ms),
        "tz": if s.tz.is_empty() { "UTC" } else { s.tz.as_str() },
        "jitter_secs": s.jitter_secs,
        "paused": s.paused,
        "created_by": s.created_by,
        "created_at": rfc3339_ms(s.created_unix_ms),
        "next_runs": s.next_runs_unix_ms.iter().map(|t| rfc3339_ms(*t)).collect::<Vec<_>>(),
        "last_fire": rfc3339_ms(s.last_fire_unix_ms),
        "last_job": s.last_run_job_id,
        "last_result": s.last_result,
        "runs_missed": s.runs_missed,
        "kept_by_target": s.managed,
    })
}

pub fn schedules_table(schedules: &[v1::ScheduleInfo], now_ms: i64) -> String {
    if schedules.is_empty() {
        return "no schedules: `drover schedule add backup TARGET --cron \"0 2 * * *\"` adds one"
            .into();
    }
    let mut t = table(&[
        "ID",
        "KIND",
        "TARGET",
        "WHEN",
        "TZ",
        "PAUSED",
        "NEXT RUNS",
        "LAST RUN",
        "RESULT",
    ]);
    for s in schedules {
        let target = if s.version.is_empty() {
            s.target.clone()
        } else {
            format!("{} {}", s.target, s.version)
        };
        let when = if s.cron.is_empty() {
            format!("at {}", rfc3339_ms(s.at_unix_ms).as_str().unwrap_or("-"))
        } else if s.jitter_secs > 0 {
            format!(
                "{} (+{} jitter)",
                s.cron,
                duration_ms(s.jitter_secs as i64 * 1000)
            )
        } else {
            s.cron.clone()
        };
        // Kept by the target's [schedule]: changed by applying the target.
        let when = if s.managed {
            format!("{when}\n[target's schedule]")
        } else {
            when
        };
        let next = s
            .next_runs_unix_ms
            .iter()
            .map(|t| rfc3339_ms(*t).as_str().unwrap_or("-").to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let last = if s.last_fire_unix_ms == 0 {
            "never".to_string()
        } else if s.last_run_job_id.is_empty() {
            ago(s.last_fire_unix_ms, now_ms)
        } else {
            format!("{} {}", ago(s.last_fire_unix_ms, now_ms), s.last_run_job_id)
        };
        let mut result = or_dash(&s.last_result);
        if s.runs_missed > 0 {
            result = format!("{result} (covered {} missed)", s.runs_missed);
        }
        t.add_row(vec![
            s.id.clone(),
            s.kind.clone(),
            target,
            when,
            if s.tz.is_empty() {
                "UTC".into()
            } else {
                s.tz.clone()
            },
            yes_no(s.paused),
            if next.is_empty() { "-".into() } else { next },
            last,
            result,
        ]);
    }
    t.to_string()
}

pub fn alert_json(a: &v1::AlertInfo) -> Value {
    json!({
        "key": a.key,
        "kind": a.kind,
        "subject": a.subject,
        "message": a.message,
        "status": if a.resolved_unix_ms == 0 { "open" } else { "resolved" },
        "opened_at": rfc3339_ms(a.opened_unix_ms),
        "last_sent": rfc3339_ms(a.last_sent_unix_ms),
        "resolved_at": rfc3339_ms(a.resolved_unix_ms),
        "sends": a.sends,
        "pending": a.pending,
    })
}

pub fn alerts_table(alerts: &[v1::AlertInfo], now_ms: i64) -> String {
    if alerts.is_empty() {
        return "no open alerts".into();
    }
    let mut t = table(&["KEY", "KIND", "SUBJECT", "SINCE", "LAST SENT", "MESSAGE"]);
    for a in alerts {
        let since = if a.resolved_unix_ms == 0 {
            when(a.opened_unix_ms, now_ms)
        } else {
            format!("resolved {}", when(a.resolved_unix_ms, now_ms))
        };
        let sent = if a.last_sent_unix_ms == 0 {
            "not yet".to_string()
        } else {
            format!("{} ({}×)", when(a.last_sent_unix_ms, now_ms), a.sends)
        };
        // Channels that have not taken the current message yet (retried every tick).
        let sent = if a.pending.is_empty() {
            sent
        } else {
            format!("{sent}\nowed: {}", a.pending.join(", "))
        };
        t.add_row(vec![
            a.key.clone(),
            a.kind.clone(),
            a.subject.clone(),
            since,
            sent,
            a.message.clone(),
        ]);
    }
    t.to_string()
}

/// The name of a health check's status as the controller sends it.
fn status_name(status: i32) -> &'static str {
    match v1::CheckStatus::try_from(status) {
        Ok(v1::CheckStatus::Healthy) => "healthy",
        Ok(v1::CheckStatus::Degraded) => "degraded",
        Ok(v1::CheckStatus::Unhealthy) => "unhealthy",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_shows_its_record_as_json_and_one_without_none() {
        use drover_model::backup::catalog::PruneLine;
        use drover_model::jobevent::Payload;
        let mut e = v1::JobEvent {
            seq: 3,
            job_id: "prune-1".into(),
            kind: "job.finished".into(),
            ..Default::default()
        };
        assert!(event_json(&e).get("payload").is_none());
        let lines = vec![PruneLine {
            id: "db-1".into(),
            copy: "local".into(),
            keep: false,
            reasons: vec![],
        }];
        e.payload = Some(drover_proto::payload::to_proto(&Payload::Prune(lines)));
        let v = event_json(&e);
        assert_eq!(v["payload"]["prune"][0]["id"], "db-1");
        assert_eq!(v["payload"]["prune"][0]["keep"], false);
    }

    #[test]
    fn alerts_table_and_json() {
        let now = 10_000_000;
        assert_eq!(alerts_table(&[], now), "no open alerts");
        let a = v1::AlertInfo {
            key: "host_down:web-1".into(),
            kind: "host_down".into(),
            subject: "web-1".into(),
            message: "host web-1 is down (no heartbeat)".into(),
            opened_unix_ms: now - 60_000,
            last_sent_unix_ms: 0,
            resolved_unix_ms: 0,
            sends: 0,
            pending: vec!["webhook:ops".into()],
        };
        let table = alerts_table(std::slice::from_ref(&a), now);
        assert!(table.contains("host_down:web-1"), "{table}");
        assert!(table.contains("not yet"), "{table}");
        assert!(table.contains("owed: webhook:ops"), "{table}");
        let j = alert_json(&a);
        assert_eq!(j["status"], "open");
        assert_eq!(j["last_sent"], Value::Null);
        assert_eq!(j["pending"], serde_json::json!(["webhook:ops"]));
    }

    #[test]
    fn a_backup_with_a_corrupt_local_copy_is_never_called_verified() {
        let now = 10_000_000;
        let mut b = v1::BackupInfo {
            id: "shop-db-20261202-030000-0001".into(),
            host: "db-1".into(),
            local_dir: "/var/lib/drover/backups/shop-db/x".into(),
            remote: "s3://backups/shop-db/x/".into(),
            verified_unix_ms: now - 60_000,
            ..Default::default()
        };
        let table = backups_table(std::slice::from_ref(&b), now);
        assert!(
            table.contains("local+s3") && table.contains("60s ago"),
            "{table}"
        );
        b.local_corrupt = "corrupt (sha256 mismatch)".into();
        let table = backups_table(std::slice::from_ref(&b), now);
        assert!(table.contains("local (corrupt)+s3"), "{table}");
        assert!(table.contains("no (local corrupt)"), "{table}");
        assert!(!table.contains("60s ago"), "{table}");
        let detail = backup_detail(&b, now);
        assert!(detail.contains("(corrupt (sha256 mismatch))"), "{detail}");
        assert!(detail.contains("verified no (local corrupt)"), "{detail}");
        let j = backup_json(&b);
        assert_eq!(j["verified_at"], Value::Null);
        assert_eq!(j["local_corrupt"], "corrupt (sha256 mismatch)");
    }

    #[test]
    fn a_prune_plan_names_each_backup_and_why() {
        let now = 10 * 86_400_000;
        let line = |id: &str, copy: &str, keep: bool, reasons: &[&str]| v1::PruneLineInfo {
            host: "db-1".into(),
            id: id.into(),
            copy: copy.into(),
            keep,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            started_unix_ms: now - 3_600_000,
            size_bytes: 2048,
        };
        let mut plan = v1::PlanPruneResponse {
            target: "site".into(),
            local_policy: "last 1, 0 daily, 0 weekly, 0 monthly".into(),
            remote_policy: "last 1, 0 daily, 0 weekly, 0 monthly".into(),
            lines: vec![
                line("site-b", "local", true, &["last"]),
                line("site-a", "local", false, &[]),
            ],
        };
        let text = prune_plan_text(&plan, now);
        assert!(text.contains("local copies: last 1"), "{text}");
        assert!(text.contains("site-b") && text.contains("last"), "{text}");
        assert!(text.contains("no rule keeps it"), "{text}");
        assert!(
            text.ends_with("would delete site-a (local on db-1)"),
            "{text}"
        );
        let j = prune_plan_json(&plan);
        assert_eq!(j["would_delete"], 1);
        assert_eq!(j["dry_run"], true);
        assert_eq!(j["lines"][0]["id"], "site-b");
        assert_eq!(j["lines"][0]["reasons"], serde_json::json!(["last"]));
        assert_eq!(j["lines"][1]["keep"], false);

        plan.lines.truncate(1);
        assert!(prune_plan_text(&plan, now).ends_with("nothing to delete"));
        plan.lines.clear();
        let text = prune_plan_text(&plan, now);
        assert!(
            text.ends_with("no backups of site in the controller's catalog: nothing to delete"),
            "{text}"
        );
    }

    #[test]
    fn relative_times() {
        let now = 1_000_000_000;
        assert_eq!(ago(0, now), "never");
        assert_eq!(ago(now - 5_000, now), "5s ago");
        assert_eq!(ago(now - 600_000, now), "10m ago");
        assert_eq!(expires_in(now / 1000 + 3600 * 23, now), "in 23h");
        assert_eq!(expires_in(now / 1000 - 10, now), "expired 10s ago");
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(12_540), "12.5s");
        assert_eq!(duration_ms(125_000), "2m05s");
        assert_eq!(duration_ms(3_720_000), "1h02m");
        assert_eq!(short_digest("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn host_json_has_the_documented_fields() {
        let h = v1::HostInfo {
            name: "web-1".into(),
            state: "connected".into(),
            health: "degraded".into(),
            last_seen_unix_ms: 1_700_000_000_000,
            ..Default::default()
        };
        let v = host_json(&h);
        assert_eq!(v["name"], "web-1");
        assert_eq!(v["state"], "connected");
        assert_eq!(v["health"], "degraded");
        assert_eq!(v["last_seen"], "2023-11-14T22:13:20Z");
    }

    #[test]
    fn host_detail_and_json_show_live_apps() {
        let h = v1::HostInfo {
            name: "web-1".into(),
            last_report: Some(v1::HealthReport {
                apps: vec![v1::AppStatus {
                    app: "api".into(),
                    version: "v1.4.2".into(),
                    running: true,
                    listen: "0.0.0.0:8080".into(),
                    requests: 1200,
                    status_5xx: 3,
                    p95_ms: 41,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = host_detail(&h, 0);
        let row = text.lines().find(|l| l.contains("api")).unwrap();
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            words,
            [
                "api",
                "v1.4.2",
                "yes",
                "0.0.0.0:8080",
                "1200",
                "3",
                "41",
                "ms"
            ]
        );
        let v = host_json(&h);
        assert_eq!(v["apps"][0]["p95_ms"], 41);
        assert_eq!(v["apps"][0]["status_5xx"], 3);
    }

    #[test]
    fn cancel_says_what_it_did() {
        let job = |state: &str| v1::JobInfo {
            id: "deploy-1".into(),
            state: state.into(),
            ..Default::default()
        };
        let told = v1::CancelJobResponse {
            job: Some(job("running")),
            already_finished: false,
            hosts_told: vec!["web-1".into()],
            hosts_pending: vec!["web-2".into()],
        };
        assert_eq!(
            cancel_text(&told),
            "cancel of job deploy-1 requested; web-1 stop(s) at the next safe point; web-2 not connected: told when it reconnects; `drover watch deploy-1` follows it to the end"
        );
        let done = v1::CancelJobResponse {
            job: Some(job("succeeded")),
            already_finished: true,
            ..Default::default()
        };
        assert_eq!(
            cancel_text(&done),
            "job deploy-1 already finished (succeeded); nothing to cancel"
        );
        let v = cancel_json(&told);
        assert_eq!(v["job"]["state"], "running");
        assert_eq!(v["hosts_told"][0], "web-1");
        assert_eq!(v["already_finished"], false);
    }

    #[test]
    fn jobs_and_releases_tables() {
        let job = v1::JobInfo {
            id: "rollback-20261123-142233-3f2a".into(),
            kind: "rollback".into(),
            app: "api".into(),
            requested_by: "alice".into(),
            created_unix_ms: 1_000,
            finished_unix_ms: 4_000,
            state: "succeeded".into(),
            targets: vec![
                v1::JobTarget {
                    host: "web-1".into(),
                    ..Default::default()
                },
                v1::JobTarget {
                    host: "web-2".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = jobs_table(&[job], 10_000);
        let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "rollback-20261123-142233-3f2a",
                "rollback",
                "api",
                "(previous)",
                "alice",
                "9s",
                "ago",
                "3.0s",
                "succeeded",
                "web-1,web-2"
            ]
        );
        let release = v1::ReleaseInfo {
            host: "web-1".into(),
            version: "v1.4.2".into(),
            digest: "sha256:0123456789abcdef".into(),
            deployed_by: "alice".into(),
            started_unix_ms: 1_000,
            finished_unix_ms: 2_500,
            result: "succeeded".into(),
            state: "live".into(),
            live: true,
            ..Default::default()
        };
        let text = releases_table(&[release], "api", 10_000);
        let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "web-1",
                "v1.4.2",
                "0123456789ab",
                "alice",
                "9s",
                "ago",
                "1.5s",
                "succeeded",
                "live",
                "LIVE"
            ]
        );
        assert!(releases_table(&[], "api", 0).contains("drover deploy api VERSION"));
    }
}
