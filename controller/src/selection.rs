//! Which hosts a deploy or rollback runs on: a pure function of the request, the inventory and
//! where the app is live, and the check that every chosen host has an agent connected.

use std::collections::BTreeMap;

/// A host as the selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub revoked: bool,
    pub session_open: bool,
    /// connected | suspect | down | revoked
    pub state: String,
    pub last_seen_unix_ms: i64,
}

/// Why no hosts could be chosen. The messages name the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("choose hosts by --host or by --label, not both")]
    Both,
    #[error("unknown host {0}; `drover hosts` lists the enrolled ones")]
    UnknownHost(String),
    #[error(
        "host {0} is revoked; enroll it again with a new token (`drover token create --host {0}`)"
    )]
    Revoked(String),
    #[error("no enrolled host has the labels {0}; `drover hosts --json` shows each host's labels")]
    NoLabelMatch(String),
    #[error("no hosts are enrolled yet: `drover token create --host NAME`, then enroll the agent")]
    NoHosts,
    #[error(
        "{app} is live on no host yet and {enrolled} hosts are enrolled; name the hosts: --host NAME or --label k=v"
    )]
    NameThem { app: String, enrolled: usize },
    #[error("the {what} needs a connected agent on every host: {hosts}")]
    NotConnected { what: &'static str, hosts: String },
}

/// Chooses the hosts for a job on `app`, in the order they will run.
///
/// By name (`names`, in the order given, each once), or every non-revoked host whose labels
/// include all of `labels` (by name). With neither: the non-revoked hosts in `live_on` (where
/// the app is live); if none, the only enrolled host when there is exactly one.
pub fn select_hosts(
    inventory: &[Candidate],
    app: &str,
    names: &[String],
    labels: &BTreeMap<String, String>,
    live_on: &[String],
) -> Result<Vec<String>, SelectError> {
    if !names.is_empty() && !labels.is_empty() {
        return Err(SelectError::Both);
    }
    let find = |name: &str| inventory.iter().find(|c| c.name == name);
    if !names.is_empty() {
        let mut chosen: Vec<String> = Vec::new();
        for name in names {
            let host = find(name).ok_or_else(|| SelectError::UnknownHost(name.clone()))?;
            if host.revoked {
                return Err(SelectError::Revoked(name.clone()));
            }
            if !chosen.contains(name) {
                chosen.push(name.clone());
            }
        }
        return Ok(chosen);
    }
    let usable = || inventory.iter().filter(|c| !c.revoked);
    if !labels.is_empty() {
        let mut chosen: Vec<String> = usable()
            .filter(|c| labels.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
            .map(|c| c.name.clone())
            .collect();
        if chosen.is_empty() {
            let wanted = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            return Err(SelectError::NoLabelMatch(wanted));
        }
        chosen.sort();
        return Ok(chosen);
    }
    let mut live: Vec<String> = usable()
        .filter(|c| live_on.contains(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if !live.is_empty() {
        live.sort();
        return Ok(live);
    }
    let all: Vec<&Candidate> = usable().collect();
    match all.as_slice() {
        [] => Err(SelectError::NoHosts),
        [only] => Ok(vec![only.name.clone()]),
        many => Err(SelectError::NameThem {
            app: app.to_string(),
            enrolled: many.len(),
        }),
    }
}

/// Refuses unless every chosen host has a session open now (a job waits for no one), naming
/// each missing host with its state and when it was last seen.
pub fn require_connected(
    inventory: &[Candidate],
    chosen: &[String],
    what: &'static str,
    now_ms: i64,
) -> Result<(), SelectError> {
    let missing: Vec<String> = chosen
        .iter()
        .filter_map(|name| inventory.iter().find(|c| &c.name == name))
        .filter(|c| !c.session_open)
        .map(|c| {
            format!(
                "{} is {}, last seen {}",
                c.name,
                c.state,
                drover_model::units::ago(c.last_seen_unix_ms, now_ms)
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SelectError::NotConnected {
            what,
            hosts: missing.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, labels: &[(&str, &str)], revoked: bool, open: bool) -> Candidate {
        Candidate {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            revoked,
            session_open: open,
            state: if open { "connected" } else { "down" }.into(),
            last_seen_unix_ms: 0,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn labels(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_selection_table() {
        let inv = vec![
            host("web-2", &[("role", "web"), ("env", "prod")], false, true),
            host("web-1", &[("role", "web"), ("env", "prod")], false, true),
            host("web-3", &[("role", "web"), ("env", "prod")], true, false),
            host("db-1", &[("role", "db")], false, false),
        ];
        let none = BTreeMap::new();
        let sel = |n: &[&str], l: &[(&str, &str)], live: &[&str]| {
            select_hosts(&inv, "api", &names(n), &labels(l), &names(live))
        };
        // By name: in the order given, once each.
        assert_eq!(
            sel(&["web-2", "web-1", "web-2"], &[], &[]),
            Ok(names(&["web-2", "web-1"]))
        );
        assert_eq!(
            sel(&["nope"], &[], &[]),
            Err(SelectError::UnknownHost("nope".into()))
        );
        assert_eq!(
            sel(&["web-3"], &[], &[]),
            Err(SelectError::Revoked("web-3".into()))
        );
        // By labels: all must match; revoked hosts are left out; sorted by name.
        assert_eq!(
            sel(&[], &[("role", "web")], &[]),
            Ok(names(&["web-1", "web-2"]))
        );
        assert_eq!(
            sel(&[], &[("role", "web"), ("env", "staging")], &[]),
            Err(SelectError::NoLabelMatch("env=staging,role=web".into()))
        );
        assert_eq!(
            sel(&["web-1"], &[("role", "web")], &[]),
            Err(SelectError::Both)
        );
        // Neither: where the app is live (not revoked hosts).
        assert_eq!(sel(&[], &[], &["web-3", "web-2"]), Ok(names(&["web-2"])));
        // Live nowhere and several hosts: name them.
        let err = select_hosts(&inv, "api", &[], &none, &[]).unwrap_err();
        assert_eq!(
            err,
            SelectError::NameThem {
                app: "api".into(),
                enrolled: 3
            }
        );
        assert!(
            err.to_string()
                .contains("name the hosts: --host NAME or --label k=v")
        );
        // Exactly one usable host: that one.
        let one = vec![
            host("solo", &[], false, true),
            host("old", &[], true, false),
        ];
        assert_eq!(
            select_hosts(&one, "api", &[], &none, &[]),
            Ok(names(&["solo"]))
        );
        assert_eq!(
            select_hosts(&[], "api", &[], &none, &[]),
            Err(SelectError::NoHosts)
        );
    }

    #[test]
    fn every_chosen_host_must_be_connected() {
        let inv = vec![
            host("web-1", &[], false, true),
            host("web-2", &[], false, false),
        ];
        assert!(require_connected(&inv, &names(&["web-1"]), "deploy", 0).is_ok());
        let err = require_connected(&inv, &names(&["web-1", "web-2"]), "deploy", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the deploy needs a connected agent on every host: web-2 is down, last seen never"
        );
    }
}
