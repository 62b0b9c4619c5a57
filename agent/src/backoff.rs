//! Reconnect backoff: exponential with jitter, capped. A pure function so it can be tested.

use std::time::Duration;

/// The delay before reconnect attempt `attempt` (0-based): `base * 2^attempt`, capped at `cap`,
/// then scaled by a jitter factor in [0.5, 1.0] (`jitter` is a uniform sample in [0, 1)).
/// Jitter spreads a fleet's reconnects after a controller restart.
pub fn delay(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    let capped = exp.min(cap);
    capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps_at_sixty_seconds() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        assert_eq!(delay(0, base, cap, 1.0), Duration::from_millis(500));
        assert_eq!(delay(3, base, cap, 1.0), Duration::from_secs(4));
        assert_eq!(delay(20, base, cap, 1.0), cap);
        assert_eq!(delay(u32::MAX, base, cap, 1.0), cap);
        assert_eq!(delay(20, base, cap, 0.0), Duration::from_secs(30));
        assert!(delay(2, base, cap, 0.3) < delay(2, base, cap, 0.9));
    }
}
