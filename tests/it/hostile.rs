//! Hostile input: mutated plans thrown at the parser, SQL injection through names,
//! plan paths that are not plain files, passwords that must never leak, a control
//! schema owned by someone else, and the least privilege pgshift needs.
//!
//! The fuzzer is seeded and deterministic: it prints its seed, and
//! `PGSHIFT_TEST_SEED=<n>` replays a run exactly.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::harness::*;

// ---------------------------------------------------------------------------
// A small seeded PRNG (splitmix64): no dependency, and a seed replays exactly.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// The seed: `PGSHIFT_TEST_SEED` if set, else the clock. Always printed.
fn seed(what: &str) -> u64 {
    let seed = match std::env::var("PGSHIFT_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PGSHIFT_TEST_SEED={s} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("{what}: seed {seed} (replay with PGSHIFT_TEST_SEED={seed})");
    seed
}

/// Every YAML plan of the project that is UTF-8 text: the good and bad corpus and plans/**.
fn corpus() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&fixture("plans"), &mut files);
    walk(&project_file("plans"), &mut files);
    files.sort();
    let out: Vec<(String, String)> = files
        .into_iter()
        .filter_map(|p| {
            let text = String::from_utf8(std::fs::read(&p).ok()?).ok()?;
            Some((p.display().to_string(), text))
        })
        .collect();
    assert!(out.len() >= 40, "the corpus shrank to {} files", out.len());
    out
}

/// Pieces of YAML that parsers find interesting.
const NASTY: &[&str] = &[
    "&a ",
    "*a",
    "*nowhere",
    "<<: *a",
    "!!binary ",
    "!!python/object:os.system ",
    "? ",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "|",
    ">-",
    "#",
    "%YAML 1.2\n---\n",
    "---\n",
    "...\n",
    "\t",
    "\r\n",
    "\u{feff}",
    "\u{0}",
    "\u{202e}",
    "~",
    "null",
    "1e999",
    "-9223372036854775809",
    "0x7fffffffffffffffff",
    ".nan",
    "99999999999999999999ms",
    "\\",
    "\"\\u0000\"",
    "'; DROP TABLE t; --",
];

/// One mutation of `text`; `other` is a second corpus file to splice from.
fn mutate(rng: &mut Rng, text: &str, other: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    match rng.below(14) {
        // Byte flips, then whatever UTF-8 is left.
        0 => {
            let mut b = text.as_bytes().to_vec();
            for _ in 0..1 + rng.below(8) {
                if b.is_empty() {
                    break;
                }
                let i = rng.below(b.len());
                b[i] = match rng.below(3) {
                    0 => b[i] ^ (1 << rng.below(8)),
                    1 => *rng.pick(b" :-[]{}&*!|>\"'#\t\n"),
                    _ => rng.next() as u8,
                };
            }
            return String::from_utf8_lossy(&b).into_owned();
        }
        // Truncation at any character boundary.
        1 => {
            let cut: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let at = if cut.is_empty() { 0 } else { *rng.pick(&cut) };
            return text[..at].to_string();
        }
        // Line duplication.
        2 => {
            let i = rng.below(n);
            let l = lines[i].clone();
            lines.insert(rng.below(n + 1), l);
        }
        // Line deletion.
        3 => {
            for _ in 0..1 + rng.below(3) {
                if !lines.is_empty() {
                    let i = rng.below(lines.len());
                    lines.remove(i);
                }
            }
        }
        // Indentation shift.
        4 => {
            let i = rng.below(n);
            if rng.below(2) == 0 {
                let k = 1 + rng.below(6);
                lines[i] = format!("{}{}", " ".repeat(k), lines[i]);
            } else {
                lines[i] = lines[i].trim_start().to_string();
            }
        }
        // An anchor on one value and aliases to it elsewhere.
        5 => {
            let i = rng.below(n);
            if let Some(c) = lines[i].find(": ") {
                lines[i].insert_str(c + 2, "&a ");
            }
            for _ in 0..1 + rng.below(3) {
                let j = rng.below(n);
                if let Some(c) = lines[j].find(": ") {
                    lines[j].truncate(c + 2);
                    lines[j].push_str("*a");
                }
            }
        }
        // Deep nesting in flow or block style.
        6 => {
            let depth = 1 + rng.below(300);
            let i = rng.below(n);
            let nest = if rng.below(2) == 0 {
                format!("{}x{}", "[".repeat(depth), "]".repeat(depth))
            } else {
                format!("{}x{}", "{a: ".repeat(depth), "}".repeat(depth))
            };
            match lines[i].find(": ") {
                Some(c) => {
                    lines[i].truncate(c + 2);
                    lines[i].push_str(&nest);
                }
                None => lines.insert(i, format!("x: {nest}")),
            }
        }
        // A huge scalar (up to ~1.5 MB, past the file limit).
        7 => {
            let len = *rng.pick(&[10_000, 100_000, 1_500_000]);
            let i = rng.below(n);
            let big = "A".repeat(len);
            match lines[i].find(": ") {
                Some(c) => {
                    lines[i].truncate(c + 2);
                    lines[i].push_str(&big);
                }
                None => lines.insert(i, format!("description: {big}")),
            }
        }
        // A nasty token inserted at a random place in a line.
        8 | 9 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(lines.len());
                let cut: Vec<usize> = lines[i]
                    .char_indices()
                    .map(|(k, _)| k)
                    .chain([lines[i].len()])
                    .collect();
                let at = *rng.pick(&cut);
                let token = rng.pick(NASTY).to_string();
                lines[i].insert_str(at, &token);
            }
        }
        // Lines spliced in from another plan.
        10 => {
            let o: Vec<&str> = other.lines().collect();
            if !o.is_empty() {
                let a = rng.below(o.len());
                let b = (a + 1 + rng.below(8)).min(o.len());
                let at = rng.below(n + 1);
                for (k, l) in o[a..b].iter().enumerate() {
                    lines.insert(at + k, l.to_string());
                }
            }
        }
        // Line swap.
        11 => {
            let (a, b) = (rng.below(n), rng.below(n));
            lines.swap(a, b);
        }
        // A scalar replaced by a number, a bool, null, a list or a map.
        12 => {
            let i = rng.below(n);
            if let Some(c) = lines[i].find(": ") {
                lines[i].truncate(c + 2);
                let value = rng.pick(&[
                    "0",
                    "-1",
                    "4294967296",
                    "true",
                    "null",
                    "[]",
                    "{}",
                    "1.5",
                    "\"\"",
                    "[a, b]",
                ]);
                lines[i].push_str(value);
            }
        }
        // Two mutations at once.
        _ => {
            let once = mutate(rng, text, other);
            return mutate(rng, &once, other);
        }
    }
    let mut s = lines.join("\n");
    if rng.below(4) != 0 {
        s.push('\n');
    }
    s
}

/// CPU time this thread has run (Linux `/proc/thread-self/schedstat`): unlike the
/// wall clock, it does not grow when other builds and tests load the machine.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Per-case limits: CPU time spent validating, and wall time (a hang guard).
const CASE_CPU_LIMIT: Duration = Duration::from_secs(1);
const CASE_WALL_LIMIT: Duration = Duration::from_secs(10);

/// What one case did wrong, if anything; else its CPU time and whether it was valid.
fn check_case(text: &str) -> Result<(Duration, bool), String> {
    let path = Path::new("fuzz.yaml");
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let r = catch_unwind(AssertUnwindSafe(|| {
        pgshift::plan::validate::validate(path, text)
    }));
    let took = thread_cpu().saturating_sub(cpu);
    let wall = wall.elapsed();
    let r = r.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("validate panicked: {msg}")
    })?;
    if took > CASE_CPU_LIMIT || wall > CASE_WALL_LIMIT {
        return Err(format!(
            "validate took {took:?} of CPU, {wall:?} of wall time"
        ));
    }
    if let Err(e) = &r {
        let diags = e.diagnostics();
        if diags.is_empty() {
            return Err(format!("an error without diagnostics: {e}"));
        }
        for d in diags {
            if d.pos.line < 1 || d.pos.col < 1 {
                return Err(format!(
                    "a diagnostic at line {} col {}: {d}",
                    d.pos.line, d.pos.col
                ));
            }
            if d.message.trim().is_empty() {
                return Err(format!("a diagnostic without a message: {d:?}"));
            }
        }
    }
    Ok((took, r.is_ok()))
}

/// Thousands of mutated plans through the parser, validator and lint, in-process.
#[test]
fn fuzz_validate_mutated_corpus() {
    let seed = seed("fuzz_validate_mutated_corpus");
    let cases: usize = std::env::var("PGSHIFT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4000);
    let corpus = corpus();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let (mut ok, mut invalid) = (0usize, 0usize);
    let mut failures = Vec::new();
    // The corpus itself first (the alias bomb and the deep nesting are in it), then mutants.
    let mut inputs: Vec<String> = corpus.iter().map(|(_, t)| t.clone()).collect();
    inputs.extend(explicit_bombs());
    let fixed = inputs.len();
    for i in 0..fixed + cases {
        let text = match inputs.get(i) {
            Some(t) => t.clone(),
            None => {
                let (_, base) = rng.pick(&corpus);
                let (_, other) = rng.pick(&corpus);
                mutate(&mut rng, base, other)
            }
        };
        match check_case(&text) {
            Ok((took, valid)) => {
                slowest = slowest.max(took);
                if valid { ok += 1 } else { invalid += 1 }
            }
            Err(why) => {
                let dump = std::env::temp_dir().join(format!("pgshift-fuzz-{seed}-{i}.yaml"));
                let _ = std::fs::write(&dump, &text);
                failures.push(format!(
                    "case {i}: {why} (input saved to {})",
                    dump.display()
                ));
            }
        }
    }
    let total = started.elapsed();
    println!(
        "fuzzed {} cases ({fixed} corpus/explicit + {cases} mutants) in {total:?}: {ok} valid, {invalid} invalid, slowest {slowest:?} of CPU",
        fixed + cases
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Inputs written to hurt: alias bombs, self-reference, deep nesting of every kind.
fn explicit_bombs() -> Vec<String> {
    let mut v = Vec::new();
    // A billion laughs, deeper than the corpus's.
    let mut bomb = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..30 {
        bomb.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(", ")
        ));
    }
    bomb.push_str("phases: *a29\n");
    v.push(bomb);
    // Aliases in keys and merge keys.
    v.push(
        "base: &b {name: x, sql: SELECT 1}\nphases:\n  expand:\n    - <<: *b\n      <<: *b\n"
            .into(),
    );
    v.push("? &k [a, b]\n: 1\n*k : 2\n".into());
    // Self-reference and an alias before its anchor.
    v.push("a: &a [*a]\n".into());
    v.push("phases: *later\nx: &later {}\n".into());
    // Deep nesting: flow lists, flow maps, block lists, block maps.
    for depth in [33, 1000, 100_000] {
        v.push(format!(
            "phases: {}1{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        ));
        v.push(format!(
            "phases: {}1{}\n",
            "{a: ".repeat(depth),
            "}".repeat(depth)
        ));
    }
    for depth in [33, 2000] {
        let mut s = String::from("phases:\n");
        for d in 0..depth {
            s.push_str(&format!("{}- \n", "  ".repeat(d + 1)));
        }
        v.push(s);
        let mut s = String::from("phases:\n");
        for d in 0..depth {
            s.push_str(&format!("{}k{d}:\n", "  ".repeat(d + 1)));
        }
        v.push(s);
    }
    // Huge scalars: just under and over the file limit, and a huge key.
    v.push(format!(
        "id: x\ndescription: {}\nphases: {{}}\n",
        "x".repeat(1_000_000)
    ));
    v.push(format!("{}: 1\n", "k".repeat(200_000)));
    v.push(format!("id: \"{}\"\n", "\\u0041".repeat(200_000)));
    v
}

/// A directory of its own for one test's files.
fn work_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join("pgshift-hostile").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs the binary with `env`, killing it after `limit` (a hang is a failure, not a stuck test).
fn run_limited(prog: &[&str], args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = match prog.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(bin());
            c
        }
        None => std::process::Command::new(bin()),
    };
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn pgshift");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.expect("wait for pgshift"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("pgshift {args:?} did not exit within {limit:?}");
        }
    }
}

fn pgshift_limited(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_limited(&[], args, env, Duration::from_secs(20))
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn expect_code(o: &Output, want: i32, what: &str) {
    assert_eq!(
        code(o),
        Some(want),
        "{what}: expected exit {want}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// A smaller number of mutants through the binary: exit 0 or 2, never a panic (101).
#[test]
fn fuzz_binary_never_panics() {
    let seed = seed("fuzz_binary_never_panics");
    let corpus = corpus();
    let dir = work_dir("fuzz_binary");
    let mut rng = Rng(seed ^ 0x5EED);
    let cases = 60;
    let started = Instant::now();
    let mut files = Vec::new();
    for i in 0..cases {
        let text = if i == 0 {
            explicit_bombs().swap_remove(0)
        } else {
            let (_, base) = rng.pick(&corpus);
            let (_, other) = rng.pick(&corpus);
            mutate(&mut rng, base, other)
        };
        files.push(write(&dir, &format!("case_{i}.yaml"), &text));
    }
    // One file per invocation, so an exit code belongs to one input.
    for f in &files {
        let f = f.to_str().unwrap();
        let o = pgshift_limited(&["plan", "validate", f], &[]);
        let err = stderr(&o);
        assert!(
            matches!(code(&o), Some(0) | Some(2)),
            "seed {seed}: `plan validate {f}` exited {:?}\n{err}",
            code(&o)
        );
        assert!(!err.contains("panicked"), "seed {seed}: {f}: {err}");
        if code(&o) == Some(2) {
            assert!(
                !err.trim().is_empty(),
                "seed {seed}: {f}: exit 2 and no message"
            );
        }
    }
    println!(
        "{cases} mutants through the binary in {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Injection through names.

fn invalid_at(yaml: &str, says: &str) {
    match pgshift::plan::validate::validate(Path::new("inj.yaml"), yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(says),
                "expected `{says}` in:\n{text}\nfor:\n{yaml}"
            );
        }
    }
}

const DUAL: &str = "  dual_write:\n    - name: sync\n      trigger:\n        table: t\n        set: { b: NEW.a }\n";

/// Injection through backfill `table`, `key`, `set` keys, trigger names and
/// `drop_trigger` is refused at validation: nothing reaches SQL.
#[test]
fn injection_in_backfill_trigger_drop_trigger_names_is_rejected() {
    let backfill = |table: &str, key: &str, col: &str| {
        format!(
            "id: inj\nphases:\n{DUAL}  backfill:\n    - name: fill\n      backfill:\n        table: {table}\n        key: {key}\n        set: {{ {col}: a }}\n"
        )
    };
    for hostile in [
        "'t; DROP TABLE t; --'",
        "'t WHERE false; DROP TABLE t'",
        "'t /* x */'",
        "'t\"; DROP TABLE t; --'",
    ] {
        invalid_at(&backfill(hostile, "id", "b"), "not a valid name");
    }
    invalid_at(&backfill("'public.t.x'", "id", "b"), "not more parts");
    for hostile in ["'id; DROP TABLE t'", "'id) OR (1=1'", "'id -- x'"] {
        invalid_at(&backfill("t", hostile, "b"), "not a valid name");
    }
    invalid_at(
        &backfill("t", "[id, 'x; DROP TABLE t']", "b"),
        "not a valid name",
    );
    for hostile in ["'b = 1, a'", "'b; DROP TABLE t; --'", "'\"b\" = 1 --'"] {
        invalid_at(&backfill("t", "id", hostile), "not a valid name");
    }
    // Trigger table and set/reverse keys.
    invalid_at(
        "id: inj\nphases:\n  dual_write:\n    - name: sync\n      trigger:\n        table: t\n        set: { 'b = 1; DROP TABLE t; --': NEW.a }\n",
        "not a valid name",
    );
    // drop_trigger names a step, not SQL.
    invalid_at(
        &format!(
            "id: inj\nphases:\n{DUAL}  contract:\n    - name: gate\n      gate: go\n    - name: drop_sync\n      drop_trigger: 'sync; DROP TABLE t'\n"
        ),
        "names no trigger step",
    );
}

/// Names that are valid quoted identifiers but look like SQL are quoted harmlessly:
/// a backfill over a table and columns with such names works and drops nothing,
/// also with `standard_conforming_strings = off` (backslashes in string literals).
#[tokio::test]
async fn backfill_with_hostile_quoted_names_is_quoted_harmlessly() {
    let db = TestDb::create("hostile_backfill_names").await;
    db.exec(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off;
         CREATE TABLE t (id int PRIMARY KEY);
         INSERT INTO t VALUES (1);
         CREATE TABLE \"x\"\"; DROP TABLE t; --\" (\"k\\'); DROP TABLE t; --\" int PRIMARY KEY, a text, \"b'); DROP TABLE t; --\" text);
         INSERT INTO \"x\"\"; DROP TABLE t; --\" SELECT g, 'v' || g FROM generate_series(1, 50) g;",
        db.name
    ))
    .await;
    let dir = work_dir("backfill_hostile_names");
    let plan = write(
        &dir,
        "names.yaml",
        r#"id: hostile_names
phases:
  dual_write:
    - name: sync
      trigger:
        table: '"x""; DROP TABLE t; --"'
        set: { '"b''); DROP TABLE t; --"': NEW.a }
  backfill:
    - name: fill
      backfill:
        table: '"x""; DROP TABLE t; --"'
        key: '"k\''); DROP TABLE t; --"'
        set: { '"b''); DROP TABLE t; --"': a }
        where: '"b''); DROP TABLE t; --" IS NULL'
        batch_size: 7
  contract:
    - name: gate
      gate: go
    - name: filled
      check: SELECT count(*) = 0 FROM "x""; DROP TABLE t; --" WHERE "b'); DROP TABLE t; --" IS NULL
    - name: drop_sync
      drop_trigger: sync
"#,
    );
    let p = plan.to_str().unwrap();
    let o = pgshift_limited(&["--yes", "plan", "apply", p], &[("DATABASE_URL", &db.url)]);
    expect_code(&o, 3, "apply up to the gate");
    let o = pgshift_limited(&["--yes", "resume", p], &[("DATABASE_URL", &db.url)]);
    expect_code(&o, 0, "resume to the end");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM t").await,
        1,
        "t was touched"
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM \"x\"\"; DROP TABLE t; --\" WHERE \"b'); DROP TABLE t; --\" = a"
        )
        .await,
        50
    );
}

/// A hostile `--control-schema` is quoted: the schema gets that literal name, t survives.
#[tokio::test]
async fn control_schema_with_hostile_name_is_quoted() {
    let db = TestDb::create("hostile_control_schema").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text); INSERT INTO t VALUES (1, 'x');")
        .await;
    let dir = work_dir("control_schema");
    let plan = write(
        &dir,
        "ctl.yaml",
        "id: hostile_ctl\nphases:\n  expand:\n    - name: add_b\n      sql: ALTER TABLE t ADD COLUMN IF NOT EXISTS b text\n      rollback: ALTER TABLE t DROP COLUMN IF EXISTS b\n",
    );
    let schema = "x\"; DROP TABLE t; --";
    let env = [("DATABASE_URL", db.url.as_str())];
    let o = pgshift_limited(
        &[
            "--control-schema",
            schema,
            "--yes",
            "plan",
            "apply",
            plan.to_str().unwrap(),
        ],
        &env,
    );
    expect_code(&o, 0, "apply with a hostile control schema");
    let o = pgshift_limited(
        &[
            "--control-schema",
            schema,
            "status",
            "hostile_ctl",
            "--format",
            "json",
        ],
        &env,
    );
    expect_code(&o, 0, "status with a hostile control schema");
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM t").await,
        1,
        "t was dropped or emptied"
    );
    let n: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "no schema named {schema:?}");
    let n: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename IN ('plans', 'steps', 'events')",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3, "control tables missing in {schema:?}");
}

// ---------------------------------------------------------------------------
// Plan paths that are not plain files.

/// Devices, a directory, a FIFO, a symlink loop, an unreadable and a non-UTF-8
/// file: each exits 2 at once with a clear message, and nothing is touched.
#[tokio::test]
async fn plan_paths_that_are_not_plain_files() {
    let db = TestDb::create("hostile_plan_paths").await;
    let dir = work_dir("plan_paths");
    let env = [("DATABASE_URL", db.url.as_str())];
    let link = |name: &str, to: &str| {
        let p = dir.join(name);
        std::os::unix::fs::symlink(to, &p).unwrap();
        p
    };
    let fifo = dir.join("fifo.yaml");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success(), "mkfifo");
    let subdir = dir.join("dir.yaml");
    std::fs::create_dir(&subdir).unwrap();
    let loop_ = dir.join("loop.yaml");
    std::os::unix::fs::symlink(&loop_, &loop_).unwrap();
    let binary = dir.join("latin1.yaml");
    std::fs::write(&binary, b"id: caf\xe9\nphases: {}\n").unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (link("zero.yaml", "/dev/zero"), "not a regular file"),
        (link("urandom.yaml", "/dev/urandom"), "not a regular file"),
        (link("null.yaml", "/dev/null"), "not a regular file"),
        (subdir.clone(), "directory"),
        (link("dirlink.yaml", subdir.to_str().unwrap()), "directory"),
        (fifo, "not a regular file"),
        (loop_, "symbolic links"),
        (dir.join("missing.yaml"), "No such file"),
        (binary, "not UTF-8"),
    ];
    for (path, says) in &cases {
        let p = path.to_str().unwrap();
        for args in [
            vec!["plan", "validate", p],
            vec!["--yes", "plan", "apply", p],
        ] {
            let start = Instant::now();
            let o = pgshift_limited(&args, &env);
            expect_code(&o, 2, &format!("{args:?}"));
            let err = stderr(&o);
            assert!(err.contains(says), "{args:?}: expected `{says}` in:\n{err}");
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{args:?} took {:?}",
                start.elapsed()
            );
        }
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
            .await,
        0,
        "a refused plan file created the control schema"
    );
}

/// A file its reader may not read (chmod 000), run as the unprivileged `postgres`
/// user: root reads any file, so running as root would not test this.
#[test]
fn unreadable_plan_file_as_another_user() {
    let dir = work_dir("unreadable");
    let f = write(
        &dir,
        "secret.yaml",
        "id: x\nphases:\n  contract:\n    - name: g\n      gate: go\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o000)).unwrap();
    let o = if running_as_root() {
        // Root reads any file, so the case is run as the unprivileged `postgres` user,
        // from a copy of the binary that user can reach wherever the checkout lives.
        let bin_dir =
            std::env::temp_dir().join(format!("pgshift-unreadable-bin-{}", std::process::id()));
        std::fs::create_dir_all(&bin_dir).unwrap();
        let copy = bin_dir.join("pgshift");
        std::fs::copy(bin(), &copy).unwrap();
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(&copy)
            .args(["plan", "validate", f.to_str().unwrap()])
            .env_remove("DATABASE_URL")
            .output()
            .expect(
                "runuser -u postgres (util-linux) is needed to test an unreadable file as root",
            );
        let _ = std::fs::remove_dir_all(&bin_dir);
        out
    } else {
        run_limited(
            &[],
            &["plan", "validate", f.to_str().unwrap()],
            &[],
            Duration::from_secs(20),
        )
    };
    expect_code(&o, 2, "validate an unreadable file");
    assert!(stderr(&o).contains("Permission denied"), "{}", stderr(&o));
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------
// Secrets.

const PW: &str = "S3cr3t-pw";

fn no_pw(what: &str, text: &str) {
    assert!(
        !text.contains(PW),
        "the password appears in {what}:\n{text}"
    );
}

/// Runs pgshift with `url`; the password is in neither stream.
fn run_secret(url: &str, args: &[&str]) -> Output {
    let o = pgshift_limited(args, &[("DATABASE_URL", url)]);
    no_pw(&format!("stdout of {args:?}"), &stdout(&o));
    no_pw(&format!("stderr of {args:?}"), &stderr(&o));
    o
}

/// A password in the URL or in `key=value` form appears in no output, log, hook
/// environment, run-step environment, or control-table row.
#[tokio::test]
async fn password_never_leaks() {
    let db = TestDb::create("hostile_password").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, a text); INSERT INTO t VALUES (1, 'x');")
        .await;
    let url = db.url.replacen("postgres@", &format!("postgres:{PW}@"), 1);
    assert!(url.contains(PW));
    let kv = format!(
        "host=127.0.0.1 port=5432 user=postgres password={PW} dbname={}",
        db.name
    );
    let dir = work_dir("password");
    let d = dir.display();
    let good = write(
        &dir,
        "good.yaml",
        &format!(
            "id: pw_good\nhooks:\n  on_success: env > {d}/hook_success.env\n  on_failure: env > {d}/hook_failure.env\nphases:\n  expand:\n    - name: add_b\n      sql: ALTER TABLE t ADD COLUMN IF NOT EXISTS b text\n      rollback: ALTER TABLE t DROP COLUMN IF EXISTS b\n    - name: dump_env\n      run: env > {d}/run_step.env\n      rollback: {{ run: 'true' }}\n"
        ),
    );
    let bad = write(
        &dir,
        "bad.yaml",
        &format!(
            "id: pw_bad\nhooks:\n  on_failure: env > {d}/hook_failure.env\nphases:\n  expand:\n    - name: add_c\n      sql: ALTER TABLE no_such_table ADD COLUMN c text\n      rollback: ALTER TABLE no_such_table DROP COLUMN IF EXISTS c\n"
        ),
    );
    let (g, b) = (good.to_str().unwrap(), bad.to_str().unwrap());
    expect_code(&run_secret(&url, &["plan", "validate", g]), 0, "validate");
    expect_code(&run_secret(&url, &["plan", "show", g]), 0, "show");
    expect_code(
        &run_secret(
            &url,
            &["--yes", "--log-format", "json", "-vv", "plan", "apply", g],
        ),
        0,
        "apply (success)",
    );
    expect_code(
        &run_secret(&url, &["--yes", "-vv", "plan", "apply", b]),
        1,
        "apply (failure)",
    );
    expect_code(&run_secret(&url, &["status"]), 0, "status");
    expect_code(
        &run_secret(&url, &["status", "pw_bad", "--events"]),
        0,
        "status --events",
    );
    expect_code(
        &run_secret(&url, &["status", "--format", "json", "--events"]),
        0,
        "status json",
    );
    expect_code(
        &run_secret(&url, &["--log-format", "json", "-vv", "status", "pw_good"]),
        0,
        "json log",
    );
    expect_code(
        &run_secret(&kv, &["-vv", "status", "pw_good"]),
        0,
        "status, key=value",
    );
    expect_code(
        &run_secret(&kv, &["--yes", "plan", "apply", b]),
        1,
        "apply (failure), key=value",
    );
    // Connection failures print where they tried to connect: never with the password.
    let wrong_port = url.replacen(":5432/", ":1/", 1);
    let wrong_kv = kv.replacen("port=5432", "port=1", 1);
    for (u, what) in [(&wrong_port, "URL"), (&wrong_kv, "key=value")] {
        for args in [
            vec!["status"],
            vec!["--yes", "plan", "apply", g],
            vec!["--log-format", "json", "-vv", "status"],
        ] {
            let o = run_secret(u, &args);
            assert_ne!(code(&o), Some(0), "{what} {args:?} connected to port 1?");
            assert_ne!(
                code(&o),
                Some(101),
                "{what} {args:?} panicked:\n{}",
                stderr(&o)
            );
        }
    }
    // Through --database-url as well.
    let o = pgshift_limited(&["--database-url", &wrong_port, "status"], &[]);
    no_pw("stderr with --database-url", &stderr(&o));
    no_pw("stdout with --database-url", &stdout(&o));

    for f in ["hook_success.env", "hook_failure.env", "run_step.env"] {
        let text = std::fs::read_to_string(dir.join(f))
            .unwrap_or_else(|e| panic!("{f} was not written: {e}"));
        no_pw(f, &text);
        assert!(!text.contains("DATABASE_URL"), "{f}:\n{text}");
    }
    for table in ["plans", "steps", "events", "meta", "backfill_ranges"] {
        let n = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM pgshift.{table} t WHERE t::text LIKE '%{PW}%'"
            ))
            .await;
        assert_eq!(n, 0, "the password appears in pgshift.{table}");
    }
}

// ---------------------------------------------------------------------------
// Roles: a control schema owned by someone else, and least privilege.

/// A role for one test (roles are cluster-wide): dropped first if left over.
async fn role(db: &TestDb, name: &str, attrs: &str) -> String {
    db.exec(&format!(
        "DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN {attrs}"
    ))
    .await;
    db.url.replacen("postgres@", &format!("{name}@"), 1)
}

/// Drops the test's roles: their objects live only in the test database.
async fn drop_roles(db: &TestDb, names: &[&str]) {
    for n in names {
        db.exec(&format!("DROP OWNED BY {n} CASCADE")).await;
    }
    // The database-level grant must go before the role can.
    for n in names {
        db.exec(&format!("REVOKE ALL ON DATABASE {} FROM {n}", db.name))
            .await;
        db.exec(&format!("DROP ROLE {n}")).await;
    }
}

const LP_PLAN: &str = "id: least_priv
phases:
  expand:
    - name: add_b
      sql: ALTER TABLE items ADD COLUMN IF NOT EXISTS b text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS b
  dual_write:
    - name: sync_b
      trigger:
        table: items
        set: { b: upper(NEW.a) }
  backfill:
    - name: fill_b
      backfill:
        table: items
        set: { b: upper(a) }
        where: b IS NULL
        batch_size: 10
  contract:
    - name: all_filled
      check: SELECT count(*) = 0 FROM items WHERE b IS NULL
";

/// `pgshift` schema exists, owned by another role, nothing granted: a clear error
/// naming the privilege, and nothing changed.
#[tokio::test]
async fn control_schema_owned_by_another_role() {
    let db = TestDb::create("hostile_foreign_control").await;
    let (owner, migrator) = (
        &format!("{}other_owner", prefix()),
        &format!("{}migrator_fc", prefix()),
    );
    role(&db, owner, "").await;
    let url = role(&db, migrator, "").await;
    db.exec(&format!(
        "GRANT CREATE ON DATABASE {} TO {migrator};
         CREATE SCHEMA pgshift AUTHORIZATION {owner};
         CREATE TABLE items (id int PRIMARY KEY, a text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 25) g;
         ALTER TABLE items OWNER TO {migrator};",
        db.name
    ))
    .await;
    let dir = work_dir("foreign_control");
    let plan = write(&dir, "lp.yaml", LP_PLAN);
    let o = pgshift_limited(
        &["--yes", "plan", "apply", plan.to_str().unwrap()],
        &[("DATABASE_URL", &url)],
    );
    let err = stderr(&o);
    assert!(
        matches!(code(&o), Some(1) | Some(2)),
        "exit {:?}\n{err}",
        code(&o)
    );
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("USAGE") && err.contains("pgshift"),
        "the error should name the privilege and the schema:\n{err}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgshift'").await,
        0,
        "partial control tables"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items'")
            .await,
        2,
        "the target table changed"
    );
    drop_roles(&db, &[migrator, owner]).await;
}

/// A role that owns the tables and has CREATE on the database runs sql, trigger,
/// backfill and check steps end to end; one that does not own the table gets the
/// server's "must be owner" with its SQLSTATE and the step's name.
#[tokio::test]
async fn least_privilege_end_to_end_and_not_owner() {
    let db = TestDb::create("hostile_least_privilege").await;
    let (migrator, stranger) = (
        &format!("{}migrator_lp", prefix()),
        &format!("{}stranger_lp", prefix()),
    );
    let url = role(&db, migrator, "NOSUPERUSER NOCREATEDB NOCREATEROLE").await;
    let url_stranger = role(&db, stranger, "NOSUPERUSER").await;
    db.exec(&format!(
        "GRANT CREATE ON DATABASE {d} TO {migrator}, {stranger};
         CREATE TABLE items (id int PRIMARY KEY, a text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 25) g;
         GRANT CREATE ON SCHEMA public TO {migrator};
         ALTER TABLE items OWNER TO {migrator};",
        d = db.name
    ))
    .await;
    let dir = work_dir("least_privilege");
    let plan = write(&dir, "lp.yaml", LP_PLAN);
    let p = plan.to_str().unwrap();
    // Not the owner (and no rights on the table): the step fails, naming the privilege.
    let o = pgshift_limited(
        &[
            "--yes",
            "--control-schema",
            "ctl_stranger",
            "plan",
            "apply",
            p,
        ],
        &[("DATABASE_URL", &url_stranger)],
    );
    let err = stderr(&o);
    expect_code(&o, 1, "apply as a non-owner");
    assert!(err.contains("must be owner of table items"), "{err}");
    assert!(err.contains("42501"), "no SQLSTATE in:\n{err}");
    assert!(err.contains("add_b"), "no step name in:\n{err}");
    assert!(
        err.contains("pgshift needs ownership of every table a plan changes"),
        "no privilege named in:\n{err}"
    );
    // The owner runs it all.
    let o = pgshift_limited(&["--yes", "plan", "apply", p], &[("DATABASE_URL", &url)]);
    expect_code(&o, 0, "apply as the owning non-superuser");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE b = upper(a)")
            .await,
        25
    );
    db.exec("INSERT INTO items (id, a) VALUES (100, 'new')")
        .await;
    assert_eq!(
        db.scalar_string("SELECT b FROM items WHERE id = 100")
            .await
            .as_deref(),
        Some("NEW"),
        "the trigger does not dual-write"
    );
    drop_roles(&db, &[migrator, stranger]).await;
}

/// Regression: the corpus's alias bomb took 0.3–0.5 s of CPU (debug build) to refuse (100,000
/// expanded values allowed); with 20,000 it is refused quickly.
#[test]
fn alias_bomb_is_refused_fast() {
    let bomb = std::fs::read_to_string(fixture("plans/bad/alias_bomb.yaml")).unwrap();
    for text in [bomb, explicit_bombs().swap_remove(0)] {
        let start = thread_cpu();
        let e = pgshift::plan::validate::validate(Path::new("bomb.yaml"), &text).unwrap_err();
        let took = thread_cpu().saturating_sub(start);
        assert!(e.to_string().contains("alias bomb"), "{e}");
        assert!(
            took < Duration::from_millis(500),
            "refusing an alias bomb took {took:?}"
        );
    }
}
