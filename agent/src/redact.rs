//! Secret redaction: every value the agent read from a file that holds a secret (an app's
//! `<app>.env`, a backup target's S3 credentials and PostgreSQL password file) is cut out of
//! every job event before the outbox stores it, and out of the agent's own log lines.
//!
//! An app that fails may print its environment (SQLAlchemy echoes a `DATABASE_URL` it cannot
//! parse), and that text travels in a failure's log tail. The outbox is the one door through
//! which job text leaves the host, so `Outbox::record` redacts every message and field there;
//! the daemon's log writer does the same for log lines.
//!
//! Each secret is looked for in the forms an app would print it: as is, percent-encoded
//! (upper and lower case hex, `+` for spaces), JSON-escaped, and, for a URL with a password,
//! the password alone (as is and decoded). Overlapping and adjacent matches are merged into
//! one `[redacted:NAME,...]`. Values shorter than [`MIN_LEN`] characters are not redacted: a
//! one-character secret would erase that character from every message. The agent logs a
//! warning naming such a secret (never its value).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tracing::warn;

use crate::secrets;
use crate::store::JobRecord;
use drover_model::appspec::AppSpec;
use drover_model::backup::target::TargetSpec;
use drover_model::jobevent::Payload;

/// Values shorter than this (in characters) are not redacted.
pub const MIN_LEN: usize = 6;

/// Characters left as they are by the percent-encoding apps use for URL components
/// (RFC 3986 unreserved: `A-Z a-z 0-9 - . _ ~`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The secrets the agent knows, shared by the outbox, the job runner and the log writer.
/// Cloning shares the same set. Secrets are only ever added: one rotated during the agent's
/// life is still redacted in its old form.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Each form of each secret → the secret's name.
    forms: Arc<RwLock<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.forms.read().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Redactor")
            .field("forms", &n)
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// Adds a secret `value` called `name` (its forms too). Returns false, adding nothing,
    /// when it is too short to redact.
    pub fn learn(&self, name: &str, value: &str) -> bool {
        if value.chars().count() < MIN_LEN {
            if !value.is_empty() {
                warn!(
                    secret = name,
                    min = MIN_LEN,
                    "a secret is too short to be redacted from logs and events; use a longer one"
                );
            }
            return false;
        }
        let Ok(mut map) = self.forms.write() else {
            return false;
        };
        for form in forms(value) {
            map.entry(form).or_insert_with(|| name.to_string());
        }
        true
    }

    /// Learns every secret `job` may read, through the same readers its steps use: the app's
    /// `<secrets_dir>/<app>.env` (every value in it), and for each backup target it names (a
    /// backup job's, a deploy's pre-deploy target, those in the app spec) the S3 secret key
    /// and the PostgreSQL password file. Called when a job starts, before any of its events;
    /// a file that cannot be read now is the job's own failure to report, not this one's.
    pub fn learn_job(&self, secrets_dir: &Path, job: &JobRecord) {
        let mut targets: Vec<TargetSpec> = Vec::new();
        if let Some(b) = &job.backup
            && let Ok(t) = TargetSpec::from_toml(&b.target_toml, &job.app)
        {
            targets.push(t);
        }
        if !job.kind.is_backup() {
            if let Ok(text) =
                drover_identity::files::read_private_file(&secrets::path(secrets_dir, &job.app))
                && let Ok(values) = secrets::parse(&text)
            {
                for (name, value) in &values {
                    self.learn(name, value);
                }
            }
            if let Ok(spec) = AppSpec::from_toml(&job.spec_toml, &job.app) {
                targets.extend(spec.backups);
            }
        }
        for target in &targets {
            if let Some(s3) = &target.storage.s3
                && let Ok(key) = crate::objectstore::secret_key_of(&s3.credentials_file)
            {
                self.learn("s3.secret_access_key", &key);
            }
            if let Some(pg) = target.postgres() {
                if let Some(file) = &pg.password_file
                    && let Ok(password) = crate::postgres::read_password_file(file)
                {
                    self.learn("postgres.password_file", &password);
                }
                if let Some(password) = pg.url.as_deref().and_then(url_password) {
                    self.learn("postgres.url", password);
                }
            }
        }
    }

    /// `text` with every known secret cut out.
    pub fn redact(&self, text: &str) -> String {
        match self.forms.read() {
            Ok(map) if !map.is_empty() => redact_text(text, &map),
            _ => text.to_string(),
        }
    }

    /// Redacts a message and every field value in place.
    pub fn redact_event(&self, message: &mut String, fields: &mut BTreeMap<String, String>) {
        let Ok(map) = self.forms.read() else { return };
        if map.is_empty() {
            return;
        }
        *message = redact_text(message, &map);
        for value in fields.values_mut() {
            *value = redact_text(value, &map);
        }
    }
}

impl Redactor {
    /// Redacts every string in a typed record (a release's spec, a check's evidence) in place.
    pub fn redact_payload(&self, payload: &mut Payload) {
        let Ok(map) = self.forms.read() else { return };
        if map.is_empty() {
            return;
        }
        let Ok(mut value) = serde_json::to_value(&*payload) else {
            return;
        };
        redact_strings(&mut value, &map);
        match serde_json::from_value(value) {
            Ok(redacted) => *payload = redacted,
            Err(err) => tracing::error!(error = %err, "a redacted payload does not read back"),
        }
    }
}

fn redact_strings(value: &mut serde_json::Value, map: &BTreeMap<String, String>) {
    match value {
        serde_json::Value::String(s) => *s = redact_text(s, map),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| redact_strings(v, map)),
        serde_json::Value::Object(entries) => {
            entries.values_mut().for_each(|v| redact_strings(v, map))
        }
        _ => {}
    }
}

/// The forms of `value` an app or a library would print: as is, percent-encoded, form-encoded,
/// JSON-escaped; for a URL with a password, the password (as is and decoded). Forms shorter
/// than [`MIN_LEN`] are left out.
pub fn forms(value: &str) -> Vec<String> {
    let mut out = vec![value.to_string()];
    let upper = utf8_percent_encode(value, COMPONENT).to_string();
    out.push(lower_hex(&upper));
    out.push(upper.replace("%20", "+"));
    out.push(upper);
    let json = serde_json::to_string(value).unwrap_or_default();
    out.push(json[1..json.len() - 1].to_string());
    if let Some(password) = url_password(value) {
        out.push(
            percent_decode_str(password)
                .decode_utf8_lossy()
                .into_owned(),
        );
        out.push(password.to_string());
    }
    out.retain(|f| f.chars().count() >= MIN_LEN);
    out.sort();
    out.dedup();
    out
}

/// `%2F` → `%2f`: some encoders write lower-case hex.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut after_percent = 0;
    for c in encoded.chars() {
        if c == '%' {
            after_percent = 2;
            out.push(c);
        } else if after_percent > 0 {
            after_percent -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The password of `scheme://user:password@host...`, as written (maybe percent-encoded).
fn url_password(value: &str) -> Option<&str> {
    let (_, rest) = value.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// `text` with every occurrence of every form cut out. Occurrences may overlap (two secrets
/// sharing characters, or a form inside another): every byte any occurrence covers is cut,
/// and each run of cut bytes becomes one `[redacted:NAMES]` with the names of the secrets in
/// it, in order.
pub fn redact_text(text: &str, forms: &BTreeMap<String, String>) -> String {
    // (start, end, name) of every occurrence, overlapping ones included.
    let mut hits: Vec<(usize, usize, &str)> = Vec::new();
    for (form, name) in forms {
        if form.is_empty() {
            continue;
        }
        let mut from = 0;
        while let Some(at) = text[from..].find(form.as_str()) {
            let start = from + at;
            hits.push((start, start + form.len(), name));
            // The next search starts one character later, so overlapping repeats are found.
            from = start + text[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if hits.is_empty() {
        return text.to_string();
    }
    hits.sort();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < hits.len() {
        let (start, mut end, _) = hits[i];
        let mut names: Vec<&str> = Vec::new();
        while i < hits.len() && hits[i].0 <= end {
            end = end.max(hits[i].1);
            if !names.contains(&hits[i].2) {
                names.push(hits[i].2);
            }
            i += 1;
        }
        out.push_str(&text[copied..start]);
        out.push_str("[redacted:");
        out.push_str(&names.join(","));
        out.push(']');
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}

/// A log writer that redacts each line before it reaches stderr (tracing's formatter writes
/// one whole event per `write`).
#[derive(Debug, Clone)]
pub struct RedactingStderr {
    pub redactor: Redactor,
}

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.redactor.redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(secrets: &[(&str, &str)]) -> Redactor {
        let r = Redactor::default();
        for (name, value) in secrets {
            r.learn(name, value);
        }
        r
    }

    #[test]
    fn a_secret_and_its_encoded_forms_are_cut_out() {
        let url = "postgresql://app:p%40ss%20w%2Frd%21@db:5432/app";
        let r = redactor(&[("DATABASE_URL", url)]);
        for leaked in [
            url.to_string(),
            utf8_percent_encode(url, COMPONENT).to_string(),
            lower_hex(&utf8_percent_encode(url, COMPONENT).to_string()),
            "p@ss w/rd!".to_string(),
            "p%40ss%20w%2Frd%21".to_string(),
        ] {
            let text = format!("error: could not parse {leaked} (line 3)");
            let out = r.redact(&text);
            assert!(out.contains("[redacted:DATABASE_URL]"), "{out}");
            assert!(!out.contains("p@ss") && !out.contains("p%40ss"), "{out}");
            assert!(out.starts_with("error: could not parse ") && out.ends_with(" (line 3)"));
        }
        // JSON-escaped.
        let r = redactor(&[("TOKEN", "ab\"cd\\ef")]);
        assert_eq!(
            r.redact(r#"{"t":"ab\"cd\\ef"}"#),
            r#"{"t":"[redacted:TOKEN]"}"#
        );
    }

    #[test]
    fn overlapping_and_nested_secrets_leave_nothing_of_either() {
        let r = redactor(&[("A", "abcdef1234"), ("B", "1234wxyz99"), ("C", "cdef12")]);
        // A and B overlap on "1234"; C lies inside A.
        assert_eq!(r.redact("x abcdef1234wxyz99 y"), "x [redacted:A,C,B] y");
        assert_eq!(
            r.redact("cdef12 and 1234wxyz99"),
            "[redacted:C] and [redacted:B]"
        );
        // Repeats that overlap themselves.
        let r = redactor(&[("R", "aaaaaa")]);
        assert_eq!(r.redact("aaaaaaaa!"), "[redacted:R]!");
        // Adjacent occurrences merge; text around them stays, multi-byte text included.
        let r = redactor(&[("S", "sécret-1")]);
        assert_eq!(r.redact("«sécret-1sécret-1»"), "«[redacted:S]»");
    }

    #[test]
    fn short_values_are_not_redacted() {
        let r = redactor(&[("PIN", "12345"), ("EMPTY", "")]);
        assert_eq!(r.redact("port 12345 is open"), "port 12345 is open");
        assert!(!r.learn("X", "abc"));
        assert!(r.learn("Y", "abcdef"));
        // A long secret whose URL password is short: the whole value is still cut.
        let r = redactor(&[("URL", "postgres://u:pw@db/x")]);
        assert_eq!(r.redact("postgres://u:pw@db/x"), "[redacted:URL]");
        assert_eq!(r.redact("pw"), "pw");
    }

    fn private(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn job(kind: crate::store::JobKind, app: &str, spec_toml: &str) -> JobRecord {
        JobRecord {
            kind,
            app: app.into(),
            spec_toml: spec_toml.into(),
            ..JobRecord::cancelled_unstarted("j1", "t", 0)
        }
    }

    #[test]
    fn a_job_teaches_every_secret_file_it_may_read() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        private(
            &secrets.join("api.env"),
            "DATABASE_URL=postgres://u:envpassword1@db/x\nAPI_KEY='key-0123456789'\n",
        );
        let creds = dir.path().join("s3.toml");
        private(
            &creds,
            "access_key_id = \"AKIAEXAMPLE\"\nsecret_access_key = \"s3-secret-key-xyz\"\n",
        );
        let pw = dir.path().join("pg-password");
        private(&pw, "pg-password-123\n");
        let target = format!(
            "name = \"db\"\n[postgres]\nurl = \"postgresql://app@127.0.0.1:5432/\"\n\
             password_file = \"{}\"\ndatabases = [\"shop\"]\n\
             [storage.s3]\nendpoint = \"https://s3.example.net\"\nbucket = \"b\"\n\
             credentials_file = \"{}\"\n",
            pw.display(),
            creds.display()
        );
        // A backup job: its target's S3 key and password.
        let r = Redactor::default();
        let mut backup = job(crate::store::JobKind::Backup, "db", "");
        backup.backup = Some(crate::store::BackupJob {
            target_toml: target.clone(),
            ..Default::default()
        });
        r.learn_job(&secrets, &backup);
        assert_eq!(
            r.redact("s3-secret-key-xyz pg-password-123 envpassword1"),
            "[redacted:s3.secret_access_key] [redacted:postgres.password_file] envpassword1"
        );
        // A deploy: every value of its app's env file (the URL's password alone too), and
        // its pre-deploy backup target's files.
        let r = Redactor::default();
        let mut deploy = job(crate::store::JobKind::Deploy, "api", "");
        deploy.backup = backup.backup.clone();
        r.learn_job(&secrets, &deploy);
        assert_eq!(
            r.redact("envpassword1 key-0123456789 s3-secret-key-xyz"),
            "[redacted:DATABASE_URL] [redacted:API_KEY] [redacted:s3.secret_access_key]"
        );
        // Files that cannot be read teach nothing and fail nothing.
        let r = Redactor::default();
        r.learn_job(
            &dir.path().join("none"),
            &job(crate::store::JobKind::Deploy, "x", "?"),
        );
        assert_eq!(r.redact("anything"), "anything");
    }

    #[tokio::test]
    async fn the_outbox_stores_events_with_their_secrets_cut_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::store::Store::open(dir.path()).unwrap());
        let r = redactor(&[("DATABASE_URL", "postgres://u:hunter2hunter2@db/x")]);
        let outbox = crate::Outbox::new(store.clone(), r);
        outbox
            .record(crate::store::NewEvent {
                job_id: "j".into(),
                kind: "job.finished".into(),
                message: "failed: postgres://u:hunter2hunter2@db/x".into(),
                fields: BTreeMap::from([(
                    "logs".to_string(),
                    "cannot parse 'postgres%3A%2F%2Fu%3Ahunter2hunter2%40db%2Fx'".to_string(),
                )]),
                payload: None,
            })
            .await
            .unwrap();
        let stored = store.pending_after(0, 10).unwrap().remove(0);
        assert_eq!(stored.message, "failed: [redacted:DATABASE_URL]");
        assert_eq!(
            stored.fields["logs"],
            "cannot parse '[redacted:DATABASE_URL]'"
        );
    }

    #[tokio::test]
    async fn a_payload_is_stored_with_every_string_in_it_redacted() {
        use drover_model::backup::catalog::{Check, CheckResult, Verification};
        use drover_model::jobevent::Payload;
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(crate::store::Store::open(dir.path()).unwrap());
        let r = redactor(&[("PGPASSWORD", "hunter2hunter2")]);
        let outbox = crate::Outbox::new(store.clone(), r);
        let verification = Verification {
            job_id: "verify-1".into(),
            target: "db".into(),
            host: String::new(),
            backup_id: "db-1".into(),
            started_unix_ms: 1,
            finished_unix_ms: 2,
            checks: vec![Check {
                name: "restore".into(),
                result: CheckResult::Failed,
                message: "psql: password hunter2hunter2 refused".into(),
                duration_ms: 3,
                evidence: BTreeMap::from([("dsn".into(), "u:hunter2hunter2@db".into())]),
            }],
            copy: "local".into(),
            local_corrupt: String::new(),
        };
        outbox
            .record(crate::store::NewEvent {
                job_id: "verify-1".into(),
                kind: "backup.verification".into(),
                message: "verification of db: failed".into(),
                fields: BTreeMap::new(),
                payload: Some(Payload::Verification(Box::new(verification))),
            })
            .await
            .unwrap();
        let stored = store.pending_after(0, 10).unwrap().remove(0);
        let Some(Payload::Verification(v)) = stored.payload else {
            panic!("{stored:?}")
        };
        assert_eq!(
            v.checks[0].message,
            "psql: password [redacted:PGPASSWORD] refused"
        );
        assert_eq!(v.checks[0].evidence["dsn"], "u:[redacted:PGPASSWORD]@db");
        assert_eq!(v.backup_id, "db-1");
    }

    #[test]
    fn events_are_redacted_in_message_and_fields() {
        let r = redactor(&[("KEY", "hunter2hunter2")]);
        let mut message = "failed: hunter2hunter2".to_string();
        let mut fields = BTreeMap::from([("logs".to_string(), "KEY=hunter2hunter2\n".to_string())]);
        r.redact_event(&mut message, &mut fields);
        assert_eq!(message, "failed: [redacted:KEY]");
        assert_eq!(fields["logs"], "KEY=[redacted:KEY]\n");
        // Nothing known: text passes as is.
        assert_eq!(
            Redactor::default().redact("hunter2hunter2"),
            "hunter2hunter2"
        );
    }
}
