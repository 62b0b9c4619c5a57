//! A host's connection state, decided from how long it has been silent. A pure function.
//!
//! Architecture invariant: suspect and down are observations only; the controller never acts
//! destructively on them (a controller or network outage stops no container).

use std::time::Duration;

/// connected | suspect | down | revoked
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostState {
    Connected,
    Suspect,
    Down,
    Revoked,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Connected => "connected",
            HostState::Suspect => "suspect",
            HostState::Down => "down",
            HostState::Revoked => "revoked",
        }
    }
}

/// `silence` is the time since the host's last heartbeat (None: never seen).
pub fn host_state(
    revoked: bool,
    silence: Option<Duration>,
    suspect_after: Duration,
    down_after: Duration,
) -> HostState {
    match (revoked, silence) {
        (true, _) => HostState::Revoked,
        (false, None) => HostState::Down,
        (false, Some(s)) if s >= down_after => HostState::Down,
        (false, Some(s)) if s >= suspect_after => HostState::Suspect,
        (false, Some(_)) => HostState::Connected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_silence() {
        let s = |secs| Some(Duration::from_secs(secs));
        let (sus, down) = (Duration::from_secs(15), Duration::from_secs(30));
        assert_eq!(host_state(false, s(0), sus, down), HostState::Connected);
        assert_eq!(host_state(false, s(14), sus, down), HostState::Connected);
        assert_eq!(host_state(false, s(15), sus, down), HostState::Suspect);
        assert_eq!(host_state(false, s(29), sus, down), HostState::Suspect);
        assert_eq!(host_state(false, s(30), sus, down), HostState::Down);
        assert_eq!(host_state(false, None, sus, down), HostState::Down);
        assert_eq!(host_state(true, s(0), sus, down), HostState::Revoked);
    }
}
