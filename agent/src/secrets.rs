//! App secrets live on the host, never in the controller: one env file per app,
//! `<secrets_dir>/<app>.env` (`KEY=value` lines, mode 0600). A deploy reads the secrets its spec
//! declares from it and checks each (present, no placeholder, long enough) before anything
//! runs. Values never appear in errors, events or logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_identity::files::{PrivateFileError, read_private_file};
use drover_model::appspec::{AppSpec, SecretError, check_secret};

/// The file holding `app`'s secrets.
pub fn path(dir: &Path, app: &str) -> PathBuf {
    dir.join(format!("{app}.env"))
}

/// Parses `KEY=value` lines: blank lines and `#` comments are skipped, an `export ` prefix and
/// one pair of matching quotes around the value are removed. A line without `=` is an error
/// naming its number (never its content: it may be a secret).
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, EnvFileError> {
    let mut out = BTreeMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(EnvFileError::NotKeyValue { line: n + 1 });
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(EnvFileError::NoKey { line: n + 1 });
        }
        let value = value.trim();
        let unquoted = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|(open, close)| {
                value
                    .strip_prefix(*open)
                    .and_then(|v| v.strip_suffix(*close))
            })
            .unwrap_or(value);
        out.insert(key.to_string(), unquoted.to_string());
    }
    Ok(out)
}

/// Reads and checks the secrets `spec` declares; returns them as env vars. Every problem is
/// listed, with the file to fix.
pub fn load(dir: &Path, spec: &AppSpec) -> Result<BTreeMap<String, String>, SecretsError> {
    if spec.secrets.is_empty() {
        return Ok(BTreeMap::new());
    }
    let file = path(dir, &spec.name);
    let values = match read_private_file(&file) {
        Err(PrivateFileError::Missing) => BTreeMap::new(),
        Err(PrivateFileError::Unreadable(err)) => {
            return Err(SecretsError::Unreadable { file, err });
        }
        Err(PrivateFileError::Open { mode }) => return Err(SecretsError::Open { file, mode }),
        Ok(text) => match parse(&text) {
            Ok(values) => values,
            Err(err) => return Err(SecretsError::Parse { file, err }),
        },
    };
    let mut problems = Vec::new();
    let mut out = BTreeMap::new();
    for (name, rule) in &spec.secrets {
        let value = values.get(name).map(String::as_str);
        match check_secret(name, value, rule) {
            Ok(()) => {
                out.insert(name.clone(), value.unwrap_or_default().to_string());
            }
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(SecretsError::Unfit { file, problems })
    }
}

/// A line of an env file that is not `KEY=value`; names the line, never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvFileError {
    #[error("line {line} is not KEY=value")]
    NotKeyValue { line: usize },
    #[error("line {line} has no valid KEY before '='")]
    NoKey { line: usize },
}

/// Why an app's secrets cannot be used; names the file to fix, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read {}: {err}", file.display())]
    Unreadable { file: PathBuf, err: std::io::Error },
    #[error(
        "{} is readable by other users (mode {mode:o}); run chmod 600 {}",
        file.display(),
        file.display()
    )]
    Open { file: PathBuf, mode: u32 },
    #[error("{}: {err}", file.display())]
    Parse { file: PathBuf, err: EnvFileError },
    #[error(
        "{} (set them in {}: KEY=value lines, mode 0600)",
        joined(problems),
        file.display()
    )]
    Unfit {
        file: PathBuf,
        problems: Vec<SecretError>,
    },
}

fn joined(problems: &[SecretError]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn env_files_parse_with_comments_quotes_and_export() {
        let env =
            parse("# db\nexport DATABASE_URL=\"postgres://u:p@db/app\"\n\nKEY='a b'\nPLAIN=x=y\n")
                .unwrap();
        assert_eq!(env["DATABASE_URL"], "postgres://u:p@db/app");
        assert_eq!(env["KEY"], "a b");
        assert_eq!(env["PLAIN"], "x=y");
        let err = parse("OK=1\nsupersecretvalue\n").unwrap_err().to_string();
        assert_eq!(err, "line 2 is not KEY=value");
        assert!(parse("=v\n").is_err());
    }

    #[test]
    fn declared_secrets_are_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let spec = AppSpec::from_toml(
            "name = \"api\"\nimage = \"acme/api\"\n[web]\nport = 8000\nlisten = \"127.0.0.1:1\"\n\
             [secrets.SECRET_KEY]\nmin_length = 16\n[secrets.DB]\n",
            "t",
        )
        .unwrap();
        let err = load(dir.path(), &spec).unwrap_err().to_string();
        assert!(err.contains("secret DB is not set"), "{err}");
        assert!(err.contains("api.env"), "{err}");

        let file = path(dir.path(), "api");
        std::fs::write(&file, "SECRET_KEY=CHANGE_ME\nDB=postgres://x\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(dir.path(), &spec).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(dir.path(), &spec).unwrap_err().to_string();
        assert!(err.contains("SECRET_KEY holds a placeholder"), "{err}");
        assert!(!err.contains("postgres://x"), "a value leaked: {err}");

        std::fs::write(
            &file,
            "SECRET_KEY=0123456789abcdef0123\nDB=postgres://x\nOTHER=1\n",
        )
        .unwrap();
        let env = load(dir.path(), &spec).unwrap();
        assert_eq!(env.len(), 2, "only declared secrets are passed: {env:?}");
    }
}
