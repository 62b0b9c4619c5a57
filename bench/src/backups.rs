//! `drover-bench backups`: a Drover backup of a generated database of realistic content, beside
//! `pg_dump -Fc -Z0` alone, `pg_dump -Fc` and `pg_dump | gzip`, in one run, on the same cluster;
//! then the pipeline's compression + hash throughput on one core, and restore times.
//!
//! The database is generated here, not by pgbench (whose filler compresses 100× and measures
//! nothing): an orders table with random numbers, dates, a skewed vocabulary of pseudo-words
//! for cities and notes, which compresses about 2-3× like real application data. The real
//! `drover-controller`, `drover-agent` (with the host's `pg_dump`) and `drover` CLI take the
//! Drover backups. Each method runs `runs` times, interleaved; medians are reported.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use drover_agent::backup::pipeline;
use drover_e2e::pg::HostPg;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::realhost::RealHost;
use crate::{Report, cpu_with_children, median};

/// Options of `drover-bench backups`.
#[derive(Debug)]
pub struct BackupOpts {
    /// Text to generate into the table, in MiB (the database ends up somewhat larger).
    pub size_mib: u64,
    pub runs: usize,
    /// zstd level of the Drover target (`[compression] level`).
    pub level: i32,
    pub bin_dir: std::path::PathBuf,
}

/// One measured run: wall seconds, CPU seconds, bytes written.
#[derive(Debug, Clone, Copy)]
struct Run {
    wall: f64,
    cpu: f64,
    bytes: u64,
}

fn summarize(runs: &[Run]) -> Value {
    let wall: Vec<f64> = runs.iter().map(|r| r.wall).collect();
    let cpu: Vec<f64> = runs.iter().map(|r| r.cpu).collect();
    json!({
        "wall_s": wall,
        "wall_median_s": median(&wall),
        "cpu_median_s": median(&cpu),
        "bytes": runs.last().map(|r| r.bytes).unwrap_or(0),
    })
}

/// Runs a shell command line; wall and the CPU of this process's waited-for children.
fn timed_shell(line: &str, output: &Path) -> Result<Run> {
    let me = std::process::id();
    let cpu0 = cpu_with_children(me)?;
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", line])
        .status()
        .with_context(|| format!("running {line}"))?;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("{line}: {status}");
    }
    let cpu = cpu_with_children(me)? - cpu0;
    let bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(Run { wall, cpu, bytes })
}

/// A vocabulary of pseudo-words, and a skewed pick from it (common words are common).
struct Words {
    words: Vec<String>,
}

impl Words {
    fn new(rng: &mut StdRng, n: usize) -> Words {
        let letters = b"etaoinshrdlcumwfgypbvkjxqz";
        let words = (0..n)
            .map(|_| {
                let len = rng.random_range(2..11);
                (0..len)
                    .map(|_| {
                        // Skewed letters, like English.
                        let u: f64 = rng.random();
                        letters[((u * u) * letters.len() as f64) as usize] as char
                    })
                    .collect()
            })
            .collect();
        Words { words }
    }

    fn pick(&self, rng: &mut StdRng) -> &str {
        let u: f64 = rng.random();
        &self.words[((u * u * u) * self.words.len() as f64) as usize]
    }
}

/// Creates database `bench` with an `orders` table of about `size_mib` MiB of text, through
/// `COPY ... FROM STDIN`. Returns the database's size in bytes.
fn generate(pg: &HostPg, size_mib: u64) -> Result<u64> {
    pg.create_db("bench");
    pg.psql(
        "bench",
        "CREATE TABLE orders (id bigint PRIMARY KEY, created_at timestamptz, customer_id int,
         amount numeric(12,2), status text, city text, note text)",
    );
    let mut child = Command::new(pg.bin.join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{}bench", pg.url))
        .args(["-c", "COPY orders FROM STDIN (FORMAT csv)"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting psql")?;
    let mut rng = StdRng::seed_from_u64(20261123);
    let words = Words::new(&mut rng, 20_000);
    let cities: Vec<String> = (0..300)
        .map(|_| format!("{} {}", words.pick(&mut rng), words.pick(&mut rng)))
        .collect();
    let statuses = [
        "new",
        "paid",
        "shipped",
        "delivered",
        "refunded",
        "cancelled",
    ];
    let target = size_mib * 1024 * 1024;
    let mut written = 0u64;
    {
        let stdin = child.stdin.take().context("psql stdin")?;
        let mut out = BufWriter::with_capacity(1 << 20, stdin);
        let mut line = String::with_capacity(512);
        let mut id = 0u64;
        while written < target {
            id += 1;
            line.clear();
            let secs = 1_600_000_000 + rng.random_range(0..150_000_000u64);
            let note_words = rng.random_range(3..40);
            let mut note = String::new();
            for i in 0..note_words {
                if i > 0 {
                    note.push(' ');
                }
                note.push_str(words.pick(&mut rng));
            }
            use std::fmt::Write as _;
            let _ = writeln!(
                line,
                "{id},{},{},{}.{:02},{},{},{note}",
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(secs)
                ),
                rng.random_range(1..2_000_000),
                rng.random_range(0..5000),
                rng.random_range(0..100),
                statuses[rng.random_range(0..statuses.len())],
                cities[(rng.random::<f64>().powi(2) * cities.len() as f64) as usize],
            );
            out.write_all(line.as_bytes())?;
            written += line.len() as u64;
        }
        out.flush()?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("COPY into orders failed: {status}");
    }
    pg.psql("bench", "VACUUM ANALYZE orders");
    let size = pg
        .psql("bench", "SELECT pg_database_size('bench')")
        .trim()
        .parse::<u64>()
        .context("database size")?;
    Ok(size)
}

pub async fn backups(o: BackupOpts) -> Result<Report> {
    let pg = HostPg::start().context("PostgreSQL is not available on this host")?;
    let tmp = tempfile::tempdir()?;
    eprintln!("generating about {} MiB of orders…", o.size_mib);
    let started = Instant::now();
    let db_size = generate(&pg, o.size_mib)?;
    eprintln!(
        "database bench: {:.2} GiB in {:.0}s",
        db_size as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );

    let host = RealHost::start(
        &o.bin_dir,
        tmp.path(),
        &format!(
            "secrets_dir = \"{}\"\n",
            tmp.path().join("secrets").display()
        ),
    )
    .await?;
    let target = tmp.path().join("bench-db.toml");
    std::fs::write(
        &target,
        format!(
            "name = \"bench-db\"\n[postgres]\nurl = \"{}\"\ndatabases = [\"bench\"]\n\
             [compression]\nlevel = {}\n\
             [retention]\nkeep_last = 1\ndaily = 0\nweekly = 0\nmonthly = 0\n",
            pg.url, o.level
        ),
    )?;
    let target_s = target.to_str().context("path is not UTF-8")?;
    host.drover_until_ok(
        &["backup-target", "apply", target_s],
        Duration::from_secs(30),
    )
    .await?;

    let bin = pg.bin.display().to_string();
    let url = format!("{}bench", pg.url);
    let dumps = tmp.path().join("dumps");
    std::fs::create_dir_all(&dumps)?;
    let z0 = dumps.join("bench.z0.dump");
    let fc = dumps.join("bench.fc.dump");
    let gz = dumps.join("bench.sql.gz");
    let mut runs: [Vec<Run>; 4] = Default::default();
    let mut backup_ids = Vec::new();
    let mut step_ms: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for round in 0..o.runs {
        eprintln!("round {}/{}", round + 1, o.runs);
        runs[0].push(timed_shell(
            &format!("{bin}/pg_dump -Fc -Z0 -f {} '{url}'", z0.display()),
            &z0,
        )?);
        runs[1].push(timed_shell(
            &format!("{bin}/pg_dump -Fc -f {} '{url}'", fc.display()),
            &fc,
        )?);
        runs[2].push(timed_shell(
            &format!("{bin}/pg_dump '{url}' | gzip > {}", gz.display()),
            &gz,
        )?);
        // Drover: the agent's CPU (pg_dump is its child) while the real CLI runs the job.
        let agent = host.agent.pid();
        let cpu0 = cpu_with_children(agent)?;
        // Let the agent reap its pg_dump before reading its children's CPU.
        let (took, _, out) = host
            .drover(&["backup", "run", "bench-db", "--json"])
            .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let cpu = cpu_with_children(agent)? - cpu0;
        let id = finished_backup(&out)?;
        for (step, ms) in step_durations(&out) {
            step_ms.entry(step).or_default().push(ms);
        }
        let (_, _, shown) = host.drover(&["backup", "show", &id, "--json"]).await?;
        let size = serde_json::from_str::<Value>(&shown)?["size_bytes"]
            .as_u64()
            .unwrap_or(0);
        backup_ids.push(id);
        runs[3].push(Run {
            wall: took.as_secs_f64(),
            cpu,
            bytes: size,
        });
    }

    // Compression + hash on one core, in process, from the uncompressed dump: the whole
    // pipeline, then zstd alone and SHA-256 alone, each as MiB of input per CPU second.
    let eff_level = drover_model::backup::target::Compression {
        level: o.level,
        threads: 0,
    }
    .effective_level(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tp_dir = tmp.path().join("tp");
    std::fs::create_dir_all(&tp_dir)?;
    let source_bytes = std::fs::metadata(&z0)?.len();
    let me = std::process::id();
    let per_cpu_s = |work: &mut dyn FnMut() -> Result<()>| -> Result<(f64, f64)> {
        let cpu0 = crate::cpu_secs(me)?;
        let t0 = Instant::now();
        work()?;
        let cpu = crate::cpu_secs(me)? - cpu0;
        Ok((t0.elapsed().as_secs_f64(), cpu))
    };
    let mut written = None;
    let (tp_wall, tp_cpu) = per_cpu_s(&mut || {
        let mut file = std::fs::File::open(&z0)?;
        written = Some(pipeline::write(
            &mut file,
            &tp_dir,
            "tp.zst",
            &pipeline::Encode {
                zstd_level: eff_level,
                zstd_threads: 1,
                recipients: Vec::new(),
            },
            &mut |_, _| {},
        )?);
        Ok(())
    })?;
    let written = written.context("the pipeline wrote nothing")?;
    let (_, zstd_cpu) = per_cpu_s(&mut || {
        let file = std::fs::File::open(&z0)?;
        zstd::stream::copy_encode(file, std::io::sink(), eff_level)?;
        Ok(())
    })?;
    let (_, sha_cpu) = per_cpu_s(&mut || {
        use sha2::Digest;
        let mut file = std::fs::File::open(&z0)?;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)?;
        let _ = hasher.finalize();
        Ok(())
    })?;
    let src_mib = source_bytes as f64 / (1 << 20) as f64;
    let per_core_mib_s = src_mib / tp_cpu.max(0.001);
    let zstd_mib_s = src_mib / zstd_cpu.max(0.001);
    let sha_mib_s = src_mib / sha_cpu.max(0.001);

    // Restores into new databases: pg_restore of the -Z0 archive alone, and drover restore.
    let restore_plain = {
        pg.create_db("restore_plain");
        let line = format!(
            "{bin}/pg_restore --single-transaction -d '{}restore_plain' {}",
            pg.url,
            z0.display()
        );
        timed_shell(&line, &z0)?
    };
    let last = backup_ids.last().context("no backup was taken")?.clone();
    let (restore_drover, _, _) = host
        .drover(&[
            "restore",
            "bench-db",
            "--backup",
            &last,
            "--to",
            "restore_drover",
            "--json",
        ])
        .await?;
    let rows = |db: &str| pg.psql(db, "SELECT count(*) FROM orders");
    if rows("restore_drover") != rows("bench") {
        bail!("the restored database does not have the original's rows");
    }

    let med = |i: usize| median(&runs[i].iter().map(|r| r.wall).collect::<Vec<_>>());
    let (z0_s, fc_s, gz_s, drover_s) = (med(0), med(1), med(2), med(3));
    let size = |i: usize| runs[i].last().map(|r| r.bytes).unwrap_or(0);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let level = eff_level;
    let steps: Vec<String> = step_ms
        .iter()
        .map(|(step, ms)| format!("{step} {:.2} s", median(ms) / 1000.0))
        .collect();
    let summary = format!(
        "database {:.2} GiB ({} MiB of generated text), {} runs each, medians:\n\
         pg_dump -Fc -Z0 alone    {z0_s:>7.1} s  {:>8.0} MiB  {:>6.0} MiB/s of database\n\
         pg_dump -Fc              {fc_s:>7.1} s  {:>8.0} MiB\n\
         pg_dump | gzip           {gz_s:>7.1} s  {:>8.0} MiB\n\
         drover backup run        {drover_s:>7.1} s  {:>8.0} MiB  (zstd-{level}, sha256, fsync, catalog)\n\
           its steps (medians): {}\n\
         drover / pg_dump -Z0     {:.2}x (goal <= 1.2)\n\
         pg_dump|gzip / drover    {:.2}x faster (goal >= 2)\n\
         pipeline (zstd-{level} + sha256 + file), one core: {per_core_mib_s:.0} MiB/s of dump ({:.0} MiB in {tp_wall:.1} s); \
         zstd-{level} alone {zstd_mib_s:.0} MiB/s, sha256 alone {sha_mib_s:.0} MiB/s\n\
         restore into a new database: pg_restore alone {:.1} s, drover restore {:.1} s",
        db_size as f64 / (1u64 << 30) as f64,
        o.size_mib,
        o.runs,
        mib(size(0)),
        mib(db_size) / z0_s,
        mib(size(1)),
        mib(size(2)),
        mib(size(3)),
        steps.join(", "),
        drover_s / z0_s,
        gz_s / drover_s,
        mib(source_bytes),
        restore_plain.wall,
        restore_drover.as_secs_f64(),
    );
    let json = json!({
        "database_bytes": db_size,
        "generated_mib": o.size_mib,
        "runs": o.runs,
        "pg_dump_fc_z0": summarize(&runs[0]),
        "pg_dump_fc": summarize(&runs[1]),
        "pg_dump_gzip": summarize(&runs[2]),
        "drover": summarize(&runs[3]),
        "drover_step_ms": step_ms,
        "drover_over_pg_dump_z0": drover_s / z0_s,
        "gzip_over_drover": gz_s / drover_s,
        "pipeline_one_core": {
            "source_bytes": source_bytes,
            "stored_bytes": written.size,
            "wall_s": tp_wall,
            "cpu_s": tp_cpu,
            "mib_per_cpu_s": per_core_mib_s,
            "zstd_alone_mib_per_cpu_s": zstd_mib_s,
            "sha256_alone_mib_per_cpu_s": sha_mib_s,
        },
        "zstd_level": level,
        "restore_pg_restore_s": restore_plain.wall,
        "restore_drover_s": restore_drover.as_secs_f64(),
    });
    Ok(Report { summary, json })
}

/// (step, duration in ms) of each step that ended, from `drover ... --json` output.
fn step_durations(ndjson: &str) -> Vec<(String, f64)> {
    ndjson
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["kind"] == "job.step" && v["fields"]["status"] == "done")
        .filter_map(|v| {
            let step = v["fields"]["step"].as_str()?.to_string();
            let ms = v["fields"]["duration_ms"].as_str()?.parse::<f64>().ok()?;
            Some((step, ms))
        })
        .collect()
}

/// The backup id from `drover backup run --json` output.
fn finished_backup(ndjson: &str) -> Result<String> {
    for line in ndjson.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["kind"] == "job.finished" {
            let id = v["fields"]["backup_id"]
                .as_str()
                .context("job.finished without backup_id")?
                .to_string();
            return Ok(id);
        }
    }
    bail!("no job.finished in the output of drover backup run --json:\n{ndjson}")
}
