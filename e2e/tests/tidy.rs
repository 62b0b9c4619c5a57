//! The rules ARCHITECTURE.md states for the code itself, checked on the source tree: every Rust
//! file opens with a `//!` line saying what it is for; each outside system has one module
//! (sled only in each daemon's `store.rs`, bollard only in the agent's `docker.rs`, the S3 crate
//! only in the agent's `objectstore.rs`); and the dependency arrows between crates hold
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
