//! Backups as both sides see them: the target spec (`target`), the records of backups and
//! validations (`catalog`), and the pure keep rule (`retention`).

pub mod catalog;
pub mod retention;
pub mod target;

use retention::Policy;

/// The rule of a policy, for `drover backup-target` listings.
pub fn describe(policy: &Policy) -> String {
    format!(
        "last {}, {} daily, {} weekly, {} monthly",
        policy.keep_last, policy.daily, policy.weekly, policy.monthly
    )
}
