//! The rules ARCHITECTURE.md states for the code itself, checked on the source tree: every Rust
//! file opens with a `//!` line saying what it is for; each outside system has one module
//! (sled only in each daemon's `store.rs`, bollard only in the agent's `docker.rs`, the S3 crate
//! only in the agent's `objectstore.rs`); prost types only at the daemons' edges (conversion
//! modules and RPC services); and the dependency arrows between crates hold
//! (`drover-model` links no runtime, store, Docker, RPC or S3 crate; the CLI and the controller
//! do not link the agent). A failure names the file or crate and the rule.

use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file of the workspace's crates, as paths relative to the root (build output and
/// hidden folders left out).
fn rust_files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                walk(&path, root, out);
            } else if name.ends_with(".rs") {
                out.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }
    let root = root();
    let mut out = Vec::new();
    for krate in [
        "proto",
        "identity",
        "model",
        "daemon",
        "agent",
        "controller",
        "cli",
        "e2e",
        "bench",
        "testapp",
    ] {
        walk(&root.join(krate), &root, &mut out);
    }
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// The files among `files` whose text uses `crate_path` (as `name::` or `use name`) outside
/// `allowed`.
fn users_outside(files: &[String], crate_path: &str, allowed: &[&str]) -> Vec<String> {
    files
        .iter()
        .filter(|f| !allowed.contains(&f.as_str()))
        .filter(|f| {
            let text = read(f);
            text.contains(&format!("{crate_path}::")) || text.contains(&format!("use {crate_path}"))
        })
        .cloned()
        .collect()
}

#[test]
fn every_rust_file_opens_with_a_module_comment() {
    let files = rust_files();
    assert!(
        files.len() > 50,
        "the walk found only {} files: {files:?}",
        files.len()
    );
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !read(f).trim_start().starts_with("//!"))
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` line saying what they are for: {missing:?}"
    );
}

#[test]
fn each_outside_system_has_one_module() {
    let files = rust_files();
    for (krate, allowed) in [
        (
            "sled",
            &["agent/src/store.rs", "controller/src/store.rs"][..],
        ),
        ("bollard", &["agent/src/docker.rs"][..]),
        ("object_store", &["agent/src/objectstore.rs"][..]),
    ] {
        let outside = users_outside(&files, krate, allowed);
        assert!(
            outside.is_empty(),
            "{krate} is used outside its one module ({allowed:?}): {outside:?}; go through that module instead"
        );
    }
}

/// In the daemons, prost types stay at the edges: the conversion modules (`convert.rs`, and
/// drover-proto's `payload.rs` for the shared records) and the RPC services that read requests
/// and wrap converted records in responses. The rules and the store below them never see the
/// wire.
#[test]
fn the_wire_types_stay_at_the_edges() {
    let files: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| f.starts_with("agent/src/") || f.starts_with("controller/src/"))
        .collect();
    let edges = [
        "agent/src/convert.rs",
        "agent/src/enroll.rs",
        "agent/src/session.rs",
        "controller/src/convert.rs",
        "controller/src/enrollment.rs",
        "controller/src/sessions.rs",
        "controller/src/operator/mod.rs",
        "controller/src/operator/access.rs",
        "controller/src/operator/apps.rs",
        "controller/src/operator/backups.rs",
        "controller/src/operator/fleet.rs",
        "controller/src/operator/hosts.rs",
        "controller/src/operator/jobs.rs",
        "controller/src/operator/schedules.rs",
        // Each open session's outbound stream, and the services' registration.
        "controller/src/registry.rs",
        "controller/src/server.rs",
    ];
    let outside = users_outside(&files, "drover_proto", &edges);
    assert!(
        outside.is_empty(),
        "wire (prost) types used outside the conversion modules and RPC services: {outside:?}; convert in `convert.rs` and pass domain types inward"
    );
    assert!(
        users_outside(&files, "drover_proto", &[]).contains(&"agent/src/convert.rs".to_string())
    );
}

/// The return types in `text` (outside its `#[cfg(test)]` part) that are `Result<_, String>`,
/// as `fn name`: each `-> Result<` is read to its matching `>`, across lines.
fn string_errors(text: &str) -> Vec<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("-> Result<") {
        let before = &rest[..at];
        let name = before
            .rfind("fn ")
            .map(|f| {
                before[f..]
                    .split('(')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default();
        let args = &rest[at + "-> Result<".len()..];
        let (mut depth, mut end) = (1usize, args.len());
        for (i, c) in args.char_indices() {
            match c {
                '<' | '(' => depth += 1,
                '>' | ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let args: String = args[..end].split_whitespace().collect();
        if args.trim_end_matches(',').ends_with(",String") {
            found.push(name);
        }
        rest = &rest[at + 1..];
    }
    found
}

/// Libraries return typed errors (thiserror); `anyhow` is for the binaries only.
#[test]
fn libraries_return_typed_errors() {
    let binaries = [
        "agent/src/main.rs",
        "controller/src/bin/drover-controller.rs",
        "cli/src/main.rs",
    ];
    let libraries: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| {
            [
                "proto/",
                "identity/",
                "model/",
                "daemon/",
                "agent/",
                "controller/",
                "cli/",
            ]
            .iter()
            .any(|k| f.starts_with(k))
                && f.contains("/src/")
                && !binaries.contains(&f.as_str())
        })
        .collect();
    let stringly: Vec<String> = libraries
        .iter()
        .flat_map(|f| {
            string_errors(&read(f))
                .into_iter()
                .map(move |n| format!("{f}: {n}"))
        })
        .collect();
    assert!(
        stringly.is_empty(),
        "library functions returning Result<_, String>: {stringly:?}; give them a thiserror type"
    );
    let anyhow = users_outside(&libraries, "anyhow", &[]);
    assert!(
        anyhow.is_empty(),
        "anyhow used in library code: {anyhow:?}; it is for the binaries ({binaries:?})"
    );
    // The scan sees what it looks for, across lines too.
    assert_eq!(
        string_errors(
            "fn a() -> Result<u8, String> {}\nfn b(\n) -> Result<\n    Vec<(u8, u8)>,\n    String,\n> {}\nfn c() -> Result<String, E> {}"
        ),
        ["fn a", "fn b"]
    );
}

/// The check itself can fail: a file that uses a crate is found, one that does not is not.
#[test]
fn the_checks_see_what_they_look_for() {
    let files = rust_files();
    assert_eq!(
        users_outside(&files, "bollard", &[]),
        ["agent/src/docker.rs"],
        "bollard's one user"
    );
    assert!(
        users_outside(&files, "sled", &["agent/src/store.rs"])
            .contains(&"controller/src/store.rs".to_string())
    );
}

/// The crates `package` links in a normal build, directly or not (names only), from
/// `cargo tree` on the lock file.
fn linked_crates(package: &str) -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--format", "{p}", "-p", package])
        .current_dir(root())
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dependency_arrows_hold() {
    for (package, forbidden, why) in [
        (
            "drover-model",
            &[
                "tokio",
                "sled",
                "bollard",
                "tonic",
                "object_store",
                "drover-proto",
            ][..],
            "the shared vocabulary is pure data and rules",
        ),
        (
            "drover-cli",
            &[
                "drover-agent",
                "drover-controller",
                "drover-daemon",
                "bollard",
                "sled",
                "object_store",
                "age",
                "zstd",
            ][..],
            "the CLI depends on proto, identity and model only",
        ),
        (
            "drover-controller",
            &["drover-agent", "bollard", "object_store", "age", "zstd"][..],
            "the controller does not link the agent or what only the agent needs",
        ),
    ] {
        let linked = linked_crates(package);
        let bad: Vec<&&str> = forbidden
            .iter()
            .filter(|f| linked.iter().any(|l| l == **f))
            .collect();
        assert!(
            bad.is_empty(),
            "{package} links {bad:?} ({why}); `cargo tree -p {package} -e normal -i CRATE` shows the path"
        );
    }
    // The check sees what it looks for.
    let agent = linked_crates("drover-agent");
    for krate in ["bollard", "drover-model", "tokio"] {
        assert!(agent.iter().any(|l| l == krate), "{krate} in {agent:?}");
    }
}
