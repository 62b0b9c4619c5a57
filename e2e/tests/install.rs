//! `install.sh` and the systemd units: installs into a temporary DESTDIR from stub binaries
//! (never onto this machine), checks modes, idempotence, enrollment, uninstall and usage
//! errors; shellcheck on the script; the units' key settings.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const TOKEN: &str = "drover1.c2VjcmV0LWhvc3Q.0123abcd.SECRET-TOKEN-do-not-print";
const ADDR: &str = "controller.example:7443";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A temporary DESTDIR, a bin dir of stub executables and the file the stubs record into.
struct Fixture {
    tmp: TempDir,
    dest: PathBuf,
    bin: PathBuf,
    log: PathBuf,
}

/// Records its arguments (one per line, after a `--call--` line); `enroll` creates
/// identity/cert.pem in --data-dir like the real agent. Prints nothing that could hold a token.
const STUB: &str = r#"#!/bin/sh
{ echo --call--; printf '%s\n' "$@"; [ -z "${DROVER_TOKEN:-}" ] || echo "env DROVER_TOKEN=$DROVER_TOKEN"; } >> "$STUB_LOG"
if [ "$1" = enroll ]; then
  data=
  while [ $# -gt 0 ]; do
    if [ "$1" = --data-dir ]; then data=$2; fi
    shift
  done
  mkdir -p "$data/identity"
  echo stub-cert > "$data/identity/cert.pem"
  echo "enrolled (stub)"
fi
"#;

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let bin = tmp.path().join("bin");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(&bin).unwrap();
        for name in ["drover-agent", "drover-controller", "drover"] {
            let path = bin.join(name);
            fs::write(&path, STUB).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = tmp.path().join("calls.log");
        Fixture {
            tmp,
            dest,
            bin,
            log,
        }
    }

    /// `bash install.sh ARGS` with DESTDIR set (so nothing outside the temp dir is touched).
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("bash")
            .arg(repo_root().join("install.sh"))
            .args(args)
            .env("DESTDIR", &self.dest)
            .env("STUB_LOG", &self.log)
            .output()
            .unwrap();
        eprintln!(
            "install.sh {args:?} -> {}\n--- stdout\n{}--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs install.sh with `--bin-dir` pointing at the stubs and expects success.
    fn ok(&self, args: &[&str]) -> String {
        let mut all = vec!["--bin-dir", self.bin.to_str().unwrap()];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert!(
            out.status.success(),
            "install.sh {args:?} failed: {}",
            out.status
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dest.join(rel)
    }

    fn calls(&self) -> Vec<Vec<String>> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let mut calls = Vec::new();
        for line in text.lines() {
            if line == "--call--" {
                calls.push(Vec::new());
            } else {
                calls.last_mut().unwrap().push(line.to_string());
            }
        }
        calls
    }

    /// Every path under DESTDIR with its mode and (for files) contents.
    fn snapshot(&self) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dest.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                let contents = if meta.is_dir() {
                    stack.push(path.clone());
                    None
                } else {
                    Some(fs::read(&path).unwrap())
                };
                out.insert(path, (meta.permissions().mode() & 0o7777, contents));
            }
        }
        out
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn dry_run_changes_nothing_and_says_what_it_would_do() {
    let f = Fixture::new();
    let out = f.ok(&["--dry-run", "--controller", ADDR, "--token", TOKEN]);
    assert!(
        f.snapshot().is_empty(),
        "dry run created {:?}",
        f.snapshot().keys().collect::<Vec<_>>()
    );
    assert!(
        f.calls().is_empty(),
        "dry run ran a binary: {:?}",
        f.calls()
    );
    let would: Vec<&str> = out.lines().filter(|l| l.starts_with("would: ")).collect();
    assert!(
        would
            .iter()
            .any(|l| l.contains("install -m 0755") && l.ends_with("/usr/local/bin/drover-agent")),
        "{out}"
    );
    assert!(
        would
            .iter()
            .any(|l| l.contains("/etc/systemd/system/drover-agent.service")),
        "{out}"
    );
    assert!(
        would
            .iter()
            .any(|l| l.contains("enroll") && l.contains("<token redacted>")),
        "{out}"
    );
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
}

#[test]
fn installs_the_agent_with_the_right_modes() {
    let f = Fixture::new();
    f.ok(&[]);
    assert_eq!(mode(&f.path("usr/local/bin/drover-agent")), 0o755);
    assert_eq!(
        fs::read_to_string(f.path("usr/local/bin/drover-agent")).unwrap(),
        STUB
    );
    assert!(!f.path("usr/local/bin/drover-controller").exists());
    assert_eq!(
        fs::read(f.path("etc/systemd/system/drover-agent.service")).unwrap(),
        fs::read(repo_root().join("systemd/drover-agent.service")).unwrap()
    );
    assert_eq!(mode(&f.path("etc/drover/agent.toml")), 0o640);
    assert_eq!(
        fs::read(f.path("etc/drover/agent.toml")).unwrap(),
        fs::read(repo_root().join("systemd/agent.toml")).unwrap()
    );
    assert_eq!(mode(&f.path("var/lib/drover-agent")), 0o700);
    assert_eq!(
        mode(&f.path("etc/drover/secrets")),
        0o700,
        "app secrets are private"
    );
    // No token: nothing is enrolled, nothing run.
    assert!(f.calls().is_empty(), "{:?}", f.calls());
}

#[test]
fn installing_twice_is_idempotent_and_keeps_an_edited_config() {
    let f = Fixture::new();
    f.ok(&[]);
    let first = f.snapshot();
    f.ok(&[]);
    assert_eq!(f.snapshot(), first, "a second install changed the tree");

    let config = f.path("etc/drover/agent.toml");
    fs::write(
        &config,
        "# edited by the operator\nheartbeat_interval = \"9s\"\n",
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    // A data dir loosened by hand is made private again.
    fs::set_permissions(
        f.path("var/lib/drover-agent"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = f.ok(&[]);
    assert!(out.contains("kept existing config"), "{out}");
    assert_eq!(
        fs::read_to_string(&config).unwrap(),
        "# edited by the operator\nheartbeat_interval = \"9s\"\n"
    );
    assert_eq!(mode(&config), 0o600, "the operator's mode was changed");
    assert_eq!(mode(&f.path("var/lib/drover-agent")), 0o700);

    // New binaries (an upgrade) replace the installed ones.
    fs::write(f.bin.join("drover-agent"), format!("{STUB}# v2\n")).unwrap();
    f.ok(&[]);
    assert!(
        fs::read_to_string(f.path("usr/local/bin/drover-agent"))
            .unwrap()
            .ends_with("# v2\n")
    );
    assert_eq!(mode(&f.path("usr/local/bin/drover-agent")), 0o755);
}

#[test]
fn enrolls_once_and_never_prints_the_token() {
    let f = Fixture::new();
    let data_dir = f.path("var/lib/drover-agent");
    let out = f.ok(&["--controller", ADDR, "--token", TOKEN]);
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
    let calls = f.calls();
    assert_eq!(
        calls,
        vec![vec![
            "enroll".to_string(),
            "--controller".into(),
            ADDR.into(),
            "--data-dir".into(),
            data_dir.to_str().unwrap().into(),
            format!("env DROVER_TOKEN={TOKEN}"),
        ]],
        "the token reaches the agent in its environment, never in argv"
    );
    assert!(data_dir.join("identity/cert.pem").exists());

    let out = f.ok(&["--controller", ADDR, "--token", TOKEN]);
    assert!(!out.contains(TOKEN), "the token was printed:\n{out}");
    assert!(out.contains("already enrolled"), "{out}");
    assert_eq!(f.calls().len(), 1, "enrolled again: {:?}", f.calls());
}

#[test]
fn uninstall_removes_binaries_and_unit_but_keeps_config_and_data() {
    let f = Fixture::new();
    f.ok(&["--controller", ADDR, "--token", TOKEN]);
    let out = f.ok(&["--uninstall"]);
    assert!(!f.path("usr/local/bin/drover-agent").exists());
    assert!(!f.path("etc/systemd/system/drover-agent.service").exists());
    assert!(f.path("etc/drover/agent.toml").exists());
    assert!(f.path("var/lib/drover-agent/identity/cert.pem").exists());
    assert!(out.contains("kept") && out.contains("rm -rf"), "{out}");
    // Again: nothing left to remove, still fine.
    f.ok(&["--uninstall"]);
}

#[test]
fn installs_the_controller_role() {
    let f = Fixture::new();
    f.ok(&["--role", "controller"]);
    for bin in ["drover-controller", "drover"] {
        assert_eq!(
            mode(&f.path(&format!("usr/local/bin/{bin}"))),
            0o755,
            "{bin}"
        );
    }
    assert!(!f.path("usr/local/bin/drover-agent").exists());
    assert!(
        f.path("etc/systemd/system/drover-controller.service")
            .is_file()
    );
    assert!(!f.path("etc/systemd/system/drover-agent.service").exists());
    assert_eq!(mode(&f.path("etc/drover/controller.toml")), 0o640);
    assert_eq!(mode(&f.path("var/lib/drover-controller")), 0o700);
    assert!(
        !f.path("etc/drover/secrets").exists(),
        "only agents hold app secrets"
    );

    f.ok(&["--role", "controller", "--uninstall"]);
    assert!(!f.path("usr/local/bin/drover").exists());
    assert!(
        !f.path("etc/systemd/system/drover-controller.service")
            .exists()
    );
    assert!(f.path("etc/drover/controller.toml").exists());
}

#[test]
fn bad_usage_exits_2_and_a_missing_binary_exits_1() {
    let f = Fixture::new();
    for args in [
        &["--frobnicate"][..],
        &["--role", "database"],
        &["--role"],
        &["--controller", ADDR],
        &["--token", TOKEN],
        &["--token", "--dry-run"],
        &[
            "--role",
            "controller",
            "--controller",
            ADDR,
            "--token",
            TOKEN,
        ],
        &["--uninstall", "--controller", ADDR, "--token", TOKEN],
    ] {
        let out = f.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("install.sh: error: "),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(!stderr.contains(TOKEN), "{args:?}: {stderr}");
    }

    let empty = f.tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = f.run(&["--bin-dir", empty.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}/drover-agent", empty.display())),
        "{stderr}"
    );
    assert!(stderr.contains("cargo build --release"), "{stderr}");
    assert!(f.snapshot().is_empty(), "a failed install changed the tree");

    let help = f.run(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("Usage: install.sh"));
}

#[test]
fn install_sh_is_shellcheck_clean() {
    let out = match Command::new("shellcheck")
        .arg(repo_root().join("install.sh"))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("shellcheck is not installed; CI must have it (apt-get install shellcheck)");
            }
            eprintln!("skipping: shellcheck not installed");
            return;
        }
        Err(e) => panic!("running shellcheck: {e}"),
    };
    assert!(
        out.status.success(),
        "shellcheck install.sh:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `[Section]` → key → every value the key was given (a key may repeat).
fn parse_unit(path: &Path) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let text = fs::read_to_string(path).unwrap();
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(name.to_string());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{}:{}: not key=value: {raw}", path.display(), n + 1));
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("{}:{}: key outside a section", path.display(), n + 1));
        sections
            .entry(section)
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    sections
}

#[test]
fn units_are_notify_restarting_and_hardened() {
    for role in ["agent", "controller"] {
        let path = repo_root().join(format!("systemd/drover-{role}.service"));
        let unit = parse_unit(&path);
        let service = &unit["Service"];
        let one = |key: &str| -> &str {
            let values = service
                .get(key)
                .unwrap_or_else(|| panic!("{role}: no {key}="));
            values.last().unwrap()
        };
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("WatchdogSec", "30s"),
            ("Restart", "on-failure"),
            ("RestartSec", "2s"),
            ("TimeoutStopSec", "15s"),
            ("KillMode", "mixed"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("User", "drover"),
            ("StateDirectory", &format!("drover-{role}")),
            ("StateDirectoryMode", "0700"),
            ("ConfigurationDirectory", "drover"),
            ("UMask", "0077"),
            ("SystemCallFilter", "@system-service"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ] {
            assert_eq!(one(key), want, "{role}: {key}");
        }
        assert_eq!(
            one("ExecStart"),
            format!("/usr/local/bin/drover-{role} run --config /etc/drover/{role}.toml"),
            "{role}"
        );
        assert!(
            service.get("DynamicUser").is_none(),
            "{role}: fixed user, not DynamicUser"
        );
        assert!(
            unit["Unit"]["Wants"]
                .iter()
                .any(|v| v.contains("network-online.target")),
            "{role}"
        );
        assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"], "{role}");
    }

    let agent = parse_unit(&repo_root().join("systemd/drover-agent.service"));
    let service = &agent["Service"];
    assert_eq!(
        service["SupplementaryGroups"],
        ["docker"],
        "the agent must reach the Docker socket"
    );
    assert!(
        service["ReadWritePaths"]
            .iter()
            .any(|v| v.ends_with("/docker.sock")),
        "the agent unit must grant the Docker socket: {:?}",
        service["ReadWritePaths"]
    );
    assert!(
        agent["Unit"]["After"]
            .iter()
            .any(|v| v.contains("docker.service"))
    );

    let controller = parse_unit(&repo_root().join("systemd/drover-controller.service"));
    assert_eq!(
        controller["Service"]["CapabilityBoundingSet"],
        [""],
        "the controller keeps no capabilities"
    );
}
