//! Units people write in specs, configs and flags: durations (`5s`, `15m`, `24h`) and byte
//! sizes, parsed and shown.

use std::time::Duration;

/// A duration that does not parse; the message quotes the text and gives examples.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason} (examples: 5s, 15m, 24h)")]
pub struct DurationError {
    pub text: String,
    reason: humantime::DurationError,
}

/// Parses durations such as `5s`, `15m`, `24h` for config files and flags.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|reason| DurationError {
        text: s.to_string(),
        reason,
    })
}

/// A duration as people write it (`1h 30m`, `500ms`).
pub fn human(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string()
}

/// A byte count in binary units (`512 B`, `1.5 MiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// "12s ago", "3m ago", "never".
pub fn ago(then_ms: i64, now_ms: i64) -> String {
    if then_ms <= 0 {
        return "never".into();
    }
    let secs = ((now_ms - then_ms).max(0) / 1000) as u64;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        7200..=172_799 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Milliseconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
