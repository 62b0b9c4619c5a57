//! Config files: TOML read and parsed with errors that name the file, the line and the key,
//! and the bounds every duration and count in a spec or config is checked against.

use std::time::Duration;

use crate::units::human;

/// Errors reading or validating a daemon's TOML configuration; each names the file (and key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse into the expected shape; `at` is ", line N, key `k`" when
    /// known (one line, no caret drawing).
    #[error("invalid config file {path}{at}: {message}")]
    Parse {
        path: String,
        at: String,
        message: String,
    },
    #[error("invalid config {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: &'static str,
        message: String,
    },
}

/// Reads a TOML config file; the caller validates what it got.
pub fn read_toml_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text; `source` names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    source: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, key) = locate(text, e.span(), e.message());
        let mut at = String::new();
        if let Some(line) = line {
            at.push_str(&format!(", line {line}"));
        }
        if let Some(key) = key {
            at.push_str(&format!(", key `{key}`"));
        }
        ConfigError::Parse {
            path: source.to_string(),
            at,
            message: one_line(e.message()),
        }
    })
}

/// toml's message without its trailing newline, on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where a TOML error is: the 1-based line its span starts on (unless that line is blank or a
/// comment: an error about a whole document or table, such as a missing key, points there)
/// and the dotted key, from the line (`key = …` under the last `[table]` header) or from a
/// key the message names in backticks. A pure function of the text.
pub fn locate(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> (Option<usize>, Option<String>) {
    let named = message
        .split('`')
        .nth(1)
        .filter(|k| !k.is_empty() && !k.contains(char::is_whitespace))
        .map(str::to_string);
    let Some(span) = span else {
        return (None, named);
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    if line.is_empty() || line.starts_with('#') {
        return (None, named);
    }
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
            .or_else(|| l.strip_prefix('[').and_then(|r| r.split(']').next()))?;
        Some(inner.trim().to_string())
    };
    if let Some(table) = header(line) {
        return (
            Some(line_no),
            // The error may be about the table itself (`unknown field `connections`` for
            // `[connections]`) or about a key inside it.
            Some(named.map_or(table.clone(), |k| {
                if table == k || table.ends_with(&format!(".{k}")) {
                    table.clone()
                } else {
                    format!("{table}.{k}")
                }
            })),
        );
    }
    let table = text.lines().take(line_no - 1).filter_map(header).last();
    let on_line = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty());
    let key = on_line.or(named).map(|k| match &table {
        Some(t) => format!("{t}.{k}"),
        None => k,
    });
    (Some(line_no), key)
}

/// Checks that a duration from a spec or config lies in `[min, max]`: every one has bounds,
/// so a value like `18446744073709551615s` is refused at validation instead of overflowing a
/// clock later. The message gives the bounds (the caller names the key).
pub fn check_duration(value: Duration, min: Duration, max: Duration) -> Result<(), BoundsError> {
    if value < min || value > max {
        return Err(BoundsError::Duration { value, min, max });
    }
    Ok(())
}

/// Checks that a count from a spec or config lies in `[min, max]`.
pub fn check_count(value: u64, min: u64, max: u64) -> Result<(), BoundsError> {
    if value < min || value > max {
        return Err(BoundsError::Count { value, min, max });
    }
    Ok(())
}

/// A duration or count outside its bounds; the message gives the bounds, the caller names the
/// key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error(
        "{} is out of range: give a duration from {} to {}",
        human(*value),
        human(*min),
        human(*max)
    )]
    Duration {
        value: Duration,
        min: Duration,
        max: Duration,
    },
    #[error("{value} is out of range: give a number from {min} to {max}")]
    Count { value: u64, min: u64, max: u64 },
}

/// serde helper: a duration written as a string like `30s`.
pub mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::units::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        watch: Option<Watch>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Watch {
        #[serde(with = "duration_str")]
        window: Duration,
    }

    fn err(text: &str) -> String {
        parse_toml::<Doc>(text, "api.toml").unwrap_err().to_string()
    }

    #[test]
    fn bounds_name_both_ends() {
        let s = Duration::from_secs;
        assert!(check_duration(s(5), s(1), s(10)).is_ok());
        assert_eq!(
            check_duration(Duration::MAX, s(1), s(3600))
                .unwrap_err()
                .to_string(),
            format!(
                "{} is out of range: give a duration from 1s to 1h",
                humantime::format_duration(Duration::MAX)
            )
        );
        assert_eq!(
            check_duration(Duration::ZERO, s(1), s(60))
                .unwrap_err()
                .to_string(),
            "0s is out of range: give a duration from 1s to 1m"
        );
        assert_eq!(
            check_count(4_294_967_295, 1, 1000).unwrap_err().to_string(),
            "4294967295 is out of range: give a number from 1 to 1000"
        );
    }

    #[test]
    fn parse_errors_are_one_line_naming_file_line_and_key() {
        let cases = [
            (
                "# an app\nname = \"api\"\n[watch]\nwindow = \"soon\"\n",
                "invalid config file api.toml, line 4, key `watch.window`: invalid duration \"soon\"",
            ),
            (
                "# an app\nname = \"api\"\nnope = 1\n",
                "invalid config file api.toml, line 3, key `nope`: unknown field `nope`",
            ),
            // A missing key: toml points at the whole document, whose first line is a comment.
            (
                "# an app\n[watch]\nwindow = \"1s\"\n",
                "invalid config file api.toml, key `name`: missing field `name`",
            ),
            (
                "# an app\nname = \"api\"\n[watch]\n",
                "invalid config file api.toml, line 3, key `watch.window`: missing field `window`",
            ),
            (
                "# an app\nname = 3\n",
                "invalid config file api.toml, line 2, key `name`: invalid type: integer `3`",
            ),
            (
                "name = \"api\"\n[watch]\nwindow = \"1s\"\nextra = true\n",
                "invalid config file api.toml, line 4, key `watch.extra`: unknown field `extra`",
            ),
            // An unknown table is named once, not as `extra.extra`.
            (
                "name = \"api\"\n[extra]\nx = 1\n",
                "invalid config file api.toml, line 2, key `extra`: unknown field `extra`",
            ),
            (
                "# an app\nname = \"api\n",
                "invalid config file api.toml, line 2, key `name`: invalid basic string",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "{got}\nwanted {want}");
            assert!(!got.contains('\n') && !got.contains('^'), "{got:?}");
        }
    }
}
