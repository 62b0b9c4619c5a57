//! Names of things operators name: apps and backup targets (hosts and operators are named by
//! `drover_identity::validate_name`, as their certificates carry them).

/// A name for an app or a backup target: 1-63 of a-z, 0-9, '-', '_', starting with a letter.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// [`valid_name`], as the message a spec's `name` key is refused with.
pub fn check_name(s: &str) -> Result<(), NameError> {
    if valid_name(s) {
        Ok(())
    } else {
        Err(NameError(s.to_string()))
    }
}

/// A name [`valid_name`] refuses; the message quotes it and gives the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: use 1-63 of a-z, 0-9, '-', '_', starting with a letter")]
pub struct NameError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lowercase_and_start_with_a_letter() {
        for good in ["api", "shop-db", "a", "web_2"] {
            assert!(valid_name(good), "{good}");
        }
        let long = "a".repeat(64);
        for bad in ["", "Api", "2web", "-x", "a.b", "a b", long.as_str()] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
