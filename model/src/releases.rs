//! Decisions about an app's releases on one host, as pure functions of its release table: which
//! release a rollback goes back to, which ones pruning removes, which containers are orphans.
//! The controller uses the same rules to show the rollback target.

use std::collections::BTreeSet;

use crate::jobevent::{JobResult, Release, ReleaseState};

/// How many release records an app keeps on a host (including removed and failed ones).
pub const HISTORY: usize = 30;

/// The live release, if any.
pub fn live(releases: &[Release]) -> Option<&Release> {
    releases.iter().find(|r| r.state == ReleaseState::Live)
}

/// A release that went live successfully and could serve again: its containers are kept, or
/// it can be recreated from its image.
fn restorable(r: &Release) -> bool {
    r.result == Some(JobResult::Succeeded)
        && matches!(r.state, ReleaseState::Kept | ReleaseState::Removed)
        && !r.image_id.is_empty()
}

/// The release `drover rollback` goes back to. Without `to`, the newest restorable release
/// deployed before the live one (so repeated rollbacks walk back through history); with `to`,
/// the newest restorable release of that version.
pub fn rollback_target<'a>(releases: &'a [Release], to: Option<&str>) -> Option<&'a Release> {
    let candidates = releases.iter().filter(|r| restorable(r));
    match to {
        Some(version) => candidates
            .filter(|r| r.version == version)
            .max_by_key(|r| r.started_unix_ms),
        None => {
            let before = live(releases).map_or(i64::MAX, |l| l.started_unix_ms);
            candidates
                .filter(|r| r.started_unix_ms < before)
                .max_by_key(|r| r.started_unix_ms)
        }
    }
}

/// Ids of kept releases whose containers pruning removes: everything beyond the `keep` newest
/// releases (the live one counts), never the live release or the rollback target.
pub fn to_prune(releases: &[Release], keep: usize) -> Vec<String> {
    let mut protected: BTreeSet<&str> = BTreeSet::new();
    if let Some(l) = live(releases) {
        protected.insert(&l.id);
    }
    if let Some(t) = rollback_target(releases, None) {
        protected.insert(&t.id);
    }
    let mut kept: Vec<&Release> = releases
        .iter()
        .filter(|r| r.state == ReleaseState::Kept)
        .collect();
    kept.sort_by_key(|r| std::cmp::Reverse(r.started_unix_ms));
    let room = keep.saturating_sub(usize::from(live(releases).is_some()));
    kept.iter()
        .skip(room)
        .filter(|r| !protected.contains(r.id.as_str()))
        .map(|r| r.id.clone())
        .collect()
}

/// Drops the oldest finished records beyond [`HISTORY`]; live, kept and deploying records stay.
pub fn trim_history(releases: &mut Vec<Release>) {
    releases.sort_by_key(|r| r.started_unix_ms);
    let mut excess = releases.len().saturating_sub(HISTORY);
    releases.retain(|r| {
        let droppable = matches!(r.state, ReleaseState::Removed | ReleaseState::Failed);
        if excess > 0 && droppable {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

/// Names of the app's containers (given as `(name, release id)`) that belong to no live or kept
/// release: left over by a crash or a failed cleanup. Removing them is safe.
pub fn orphans(containers: &[(String, String)], releases: &[Release]) -> Vec<String> {
    let wanted: BTreeSet<&str> = releases
        .iter()
        .filter(|r| matches!(r.state, ReleaseState::Live | ReleaseState::Kept))
        .map(|r| r.id.as_str())
        .collect();
    containers
        .iter()
        .filter(|(_, release)| !wanted.contains(release.as_str()))
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rel(id: &str, version: &str, started: i64, state: ReleaseState, ok: bool) -> Release {
        Release {
            id: id.into(),
            app: "api".into(),
            version: version.into(),
            image: format!("acme/api:{version}"),
            image_id: format!("sha256:{id}"),
            job_id: id.into(),
            requested_by: "alice".into(),
            started_unix_ms: started,
            finished_unix_ms: started + 10,
            result: Some(if ok {
                JobResult::Succeeded
            } else {
                JobResult::Failed
            }),
            state,
            spec_toml: String::new(),
            containers: BTreeMap::new(),
        }
    }

    use ReleaseState::*;

    #[test]
    fn rollback_goes_to_the_newest_good_release_before_the_live_one() {
        let table = vec![
            rel("a", "v1.0.0", 1, Removed, true),
            rel("b", "v1.1.0", 2, Kept, true),
            rel("c", "v1.2.0", 3, Failed, false),
            rel("d", "v1.3.0", 4, Live, true),
        ];
        assert_eq!(rollback_target(&table, None).unwrap().id, "b");
        assert_eq!(rollback_target(&table, Some("v1.0.0")).unwrap().id, "a");
        assert!(
            rollback_target(&table, Some("v1.2.0")).is_none(),
            "a failed release is no target"
        );
        assert!(
            rollback_target(&table, Some("v1.3.0")).is_none(),
            "the live one is no target"
        );
        // After rolling back to b, the next rollback walks further back, to a.
        let after = vec![
            rel("a", "v1.0.0", 1, Removed, true),
            rel("b", "v1.1.0", 2, Live, true),
            rel("d", "v1.3.0", 4, Kept, true),
        ];
        assert_eq!(rollback_target(&after, None).unwrap().id, "a");
        assert_eq!(rollback_target(&after, Some("v1.3.0")).unwrap().id, "d");
        // Nothing older: no target.
        assert!(rollback_target(&[rel("a", "v1.0.0", 1, Live, true)], None).is_none());
        // A release whose image was never resolved cannot be recreated.
        let mut no_image = rel("a", "v1.0.0", 1, Removed, true);
        no_image.image_id.clear();
        assert!(rollback_target(&[no_image, rel("b", "v1.1.0", 2, Live, true)], None).is_none());
    }

    #[test]
    fn pruning_keeps_the_newest_the_live_one_and_the_rollback_target() {
        let table = vec![
            rel("a", "v1", 1, Kept, true),
            rel("b", "v2", 2, Kept, true),
            rel("c", "v3", 3, Kept, true),
            rel("d", "v4", 4, Kept, true),
            rel("e", "v5", 5, Live, true),
        ];
        assert_eq!(to_prune(&table, 3), vec!["b", "a"]);
        assert_eq!(
            to_prune(&table, 1),
            vec!["c", "b", "a"],
            "d is the rollback target"
        );
        assert!(to_prune(&table, 10).is_empty());
        // After a rollback to b, the newer c and d count as kept too; b is live, a the target.
        let table = vec![
            rel("a", "v1", 1, Kept, true),
            rel("b", "v2", 2, Live, true),
            rel("c", "v3", 3, Kept, true),
            rel("d", "v4", 4, Kept, true),
        ];
        assert_eq!(to_prune(&table, 2), vec!["c"]);
        // Removed and failed releases have nothing left to prune.
        let table = vec![
            rel("a", "v1", 1, Removed, true),
            rel("b", "v2", 2, Failed, false),
            rel("c", "v3", 3, Live, true),
        ];
        assert!(to_prune(&table, 1).is_empty());
    }

    #[test]
    fn history_is_trimmed_oldest_first_but_never_live_or_kept() {
        let mut table: Vec<Release> = (0..40)
            .map(|i| rel(&format!("r{i:02}"), "v", i, Removed, true))
            .collect();
        table[0].state = Kept;
        table[39].state = Live;
        trim_history(&mut table);
        assert_eq!(table.len(), HISTORY);
        assert_eq!(table[0].id, "r00", "kept survives");
        assert_eq!(table[1].id, "r11");
        assert_eq!(table.last().unwrap().id, "r39");
    }

    #[test]
    fn orphans_are_containers_of_no_live_or_kept_release() {
        let table = vec![
            rel("a", "v1", 1, Kept, true),
            rel("b", "v2", 2, Failed, false),
            rel("c", "v3", 3, Live, true),
        ];
        let containers = vec![
            ("api-web-a".to_string(), "a".to_string()),
            ("api-web-b".to_string(), "b".to_string()),
            ("api-web-c".to_string(), "c".to_string()),
            ("api-web-x".to_string(), "x".to_string()),
        ];
        assert_eq!(orphans(&containers, &table), vec!["api-web-b", "api-web-x"]);
    }
}
