//! The bad-plan corpus and the good plans, through the built binary.
//!
//! Every file in `tests/fixtures/plans/bad/` holds one mistake, and the table
//! below says where `plan validate` must report it and how. A file without a row
//! fails the test, so the corpus and its README cannot drift apart silently.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;

/// One expected diagnostic: file, line, column, rule, and a piece of the message.
struct Expect {
    file: &'static str,
    line: u32,
    col: u32,
    rule: &'static str,
    says: &'static str,
}

const fn e(
    file: &'static str,
    line: u32,
    col: u32,
    rule: &'static str,
    says: &'static str,
) -> Expect {
    Expect {
        file,
        line,
        col,
        rule,
        says,
    }
}

/// Keep in step with `tests/fixtures/plans/bad/README.md`.
const CORPUS: &[Expect] = &[
    e("alias_bomb.yaml", 5, 15, "yaml", "alias bomb"),
    e(
        "allow_unknown_rule.yaml",
        8,
        9,
        "allow",
        "`ban-drop-colum` is not a lint rule",
    ),
    e(
        "allow_without_reason.yaml",
        8,
        24,
        "empty",
        "the reason for allowing `ban-drop-column` is empty",
    ),
    e(
        "backfill_empty_set.yaml",
        11,
        14,
        "empty",
        "backfill `set` is empty",
    ),
    e(
        "backfill_outside_backfill_phase.yaml",
        8,
        7,
        "phase",
        "belongs in phase `backfill`, not `dual_write`",
    ),
    e(
        "batch_size_two_million.yaml",
        12,
        21,
        "range",
        "batch_size is 2,000,000; it must be between 1 and 1,000,000",
    ),
    e(
        "batch_size_zero.yaml",
        12,
        21,
        "range",
        "batch_size is 0; it must be between 1",
    ),
    e(
        "begin_commit_in_step.yaml",
        5,
        9,
        "transaction-control",
        "`BEGIN;`",
    ),
    e("binary_file.yaml", 1, 1, "file", "not UTF-8 text"),
    e(
        "check_query_does_not_parse.yaml",
        4,
        29,
        "sql-syntax",
        "check query does not parse at `= 0 FROM leads`",
    ),
    e(
        "column_with_space_unquoted.yaml",
        7,
        11,
        "identifier",
        "`email hash` is not a valid name",
    ),
    e(
        "concurrent_index_mixed.yaml",
        6,
        9,
        "non-transactional-mixed",
        "must be the only statement of its step",
    ),
    e(
        "deep_nesting.yaml",
        1,
        41,
        "yaml",
        "nested more than 32 levels",
    ),
    e("directory.yaml", 1, 1, "file", "it is a directory"),
    e(
        "drop_trigger_unknown_step.yaml",
        10,
        7,
        "drop-trigger",
        "`drop_trigger: sync_email_hsh` names no trigger step",
    ),
    e(
        "duplicate_step_names.yaml",
        6,
        7,
        "duplicate",
        "step name `add_email_hash` is used twice (first at line 3)",
    ),
    e(
        "duplicate_yaml_keys.yaml",
        6,
        7,
        "yaml",
        "key `sql` appears twice",
    ),
    e(
        "duration_in_days.yaml",
        6,
        15,
        "duration",
        "days are not a unit here",
    ),
    // Regression: a huge duration panicked in Duration::from_secs_f64.
    e(
        "duration_overflow.yaml",
        5,
        21,
        "duration",
        "longer than a week",
    ),
    e(
        "duration_in_parsecs.yaml",
        6,
        21,
        "duration",
        "`parsecs` is not a unit of time",
    ),
    e(
        "duration_without_unit.yaml",
        2,
        17,
        "duration",
        "lock_timeout `500` has no unit",
    ),
    e("empty_file.yaml", 1, 1, "empty", "the plan file is empty"),
    e(
        "lint_adding_required_field.yaml",
        4,
        12,
        "adding-required-field",
        "`NOT NULL` and has no default",
    ),
    e(
        "lint_backfill_without_dual_write.yaml",
        3,
        7,
        "backfill-without-dual-write",
        "no dual_write trigger on that table",
    ),
    e(
        "lint_ban_drop_column.yaml",
        6,
        12,
        "ban-drop-column",
        "dropping a column may break existing clients",
    ),
    e(
        "lint_contract_before_gate.yaml",
        3,
        7,
        "contract-before-gate",
        "contract step before any gate or check",
    ),
    e(
        "lint_drop_column_under_trigger.yaml",
        13,
        12,
        "drop-column-under-trigger",
        "while the dual-write trigger of step `sync_display_name` still uses it",
    ),
    e(
        "lint_missing_rollback.yaml",
        3,
        7,
        "missing-rollback",
        "has no rollback",
    ),
    e(
        "lint_scan_under_exclusive_lock.yaml",
        6,
        12,
        "scan-under-exclusive-lock",
        "`VALIDATE CONSTRAINT` reads every row of `leads`",
    ),
    e(
        "lock_timeout_zero.yaml",
        2,
        17,
        "range",
        "lock_timeout 0 means wait forever",
    ),
    e("missing_step_name.yaml", 3, 7, "missing", "has no `name`"),
    e(
        "misspelled_batchsize.yaml",
        12,
        9,
        "unknown-key",
        "unknown key `batchsize` in backfill",
    ),
    e(
        "phase_not_a_list.yaml",
        3,
        5,
        "type",
        "phase `expand` must be a list of steps",
    ),
    e(
        "rollback_on_gate.yaml",
        5,
        7,
        "rollback",
        "a check or gate step changes nothing",
    ),
    e(
        "sql_syntax_error_multiline.yaml",
        7,
        9,
        "sql-syntax",
        "does not parse at `ALTER TABEL leads ADD`",
    ),
    e(
        "step_name_not_snake_case.yaml",
        3,
        13,
        "name",
        "step name `Add-Email-Hash` is not snake_case",
    ),
    e(
        "step_with_two_kinds.yaml",
        5,
        7,
        "kind",
        "2 kind keys (gate, check)",
    ),
    e(
        "step_without_kind.yaml",
        3,
        7,
        "kind",
        "the step has no kind key",
    ),
    e(
        "table_name_injection.yaml",
        5,
        16,
        "identifier",
        "`leads; drop table users` is not a valid name",
    ),
    e(
        "trigger_empty_set.yaml",
        6,
        14,
        "empty",
        "trigger `set` is empty",
    ),
    e(
        "trigger_outside_dual_write.yaml",
        4,
        7,
        "phase",
        "belongs in phase `dual_write`, not `expand`",
    ),
    e(
        "unknown_phase.yaml",
        6,
        3,
        "unknown-key",
        "unknown key `migrate` in phases",
    ),
    e(
        "unknown_settings_key.yaml",
        3,
        3,
        "unknown-key",
        "unknown key `lock_timout_retries` in settings",
    ),
    e(
        "unknown_step_key.yaml",
        5,
        7,
        "unknown-key",
        "unknown key `rollbak`",
    ),
    e(
        "unknown_throttle_key.yaml",
        14,
        11,
        "unknown-key",
        "unknown key `max_replica_lagg` in throttle",
    ),
    e(
        "unknown_top_level_key.yaml",
        2,
        1,
        "unknown-key",
        "unknown key `descripton` in the plan",
    ),
    e(
        "workers_zero.yaml",
        12,
        18,
        "range",
        "workers is 0; it must be between 1 and 32",
    ),
    e("yaml_syntax_error.yaml", 5, 6, "yaml", "not valid YAML"),
];

fn bad_dir() -> PathBuf {
    fixture("plans/bad")
}

/// A scratch directory of this test's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgshift-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Validates `file`; returns the exit code, stderr, and the time it took.
fn validate(file: &Path) -> (Option<i32>, String, Duration) {
    let start = Instant::now();
    let o = pgshift(&["plan", "validate", file.to_str().expect("utf-8 path")]);
    (o.status.code(), stderr(&o), start.elapsed())
}

#[test]
fn every_bad_plan_is_refused_where_the_mistake_is() {
    let mut failures = Vec::new();
    for x in CORPUS {
        let path = bad_dir().join(x.file);
        let (code, err, took) = validate(&path);
        let prefix = format!(
            "{}:{}:{}: error[{}]: ",
            path.display(),
            x.line,
            x.col,
            x.rule
        );
        let hit = err
            .lines()
            .any(|l| l.starts_with(&prefix) && l.contains(x.says));
        if code != Some(2) || !hit {
            failures.push(format!(
                "{}: want exit 2 and a line starting `{prefix}` containing `{}`; got exit {code:?}:\n{err}",
                x.file, x.says
            ));
        }
        // Hostile inputs (alias bomb, deep nesting) must fail fast, not grind.
        if took > Duration::from_secs(5) {
            failures.push(format!("{}: took {took:?}", x.file));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Every message of the corpus, whole, as the operator reads it: a change to any
/// wording, position or help shows up as a reviewed snapshot diff.
#[test]
fn corpus_messages_snapshot() {
    let rel = Path::new("tests/fixtures/plans/bad");
    for file in yaml_files(&bad_dir()) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = match pgshift::plan::load(&rel.join(&name)) {
            Ok(_) => panic!("{name} validates, but the corpus holds only bad plans"),
            Err(e) => e.to_string(),
        };
        insta::assert_snapshot!(name.trim_end_matches(".yaml").to_string(), text);
    }
}

#[test]
fn every_file_in_the_corpus_has_an_expectation() {
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(bad_dir()).expect("read corpus dir") {
        let name = entry
            .expect("dir entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".yaml") && !CORPUS.iter().any(|x| x.file == name) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "add these to CORPUS and README.md: {missing:?}"
    );
    assert!(
        CORPUS.len() >= 35,
        "the corpus should cover at least 35 mistakes"
    );
    let readme = std::fs::read_to_string(bad_dir().join("README.md")).expect("corpus README");
    for x in CORPUS {
        assert!(
            readme.contains(&format!("`{}`", x.file)),
            "README.md lacks {}",
            x.file
        );
    }
}

#[test]
fn a_ten_megabyte_file_is_refused_without_reading_it() {
    let dir = scratch("ten_mb");
    let path = dir.join("huge.yaml");
    let line = "# padding padding padding padding padding padding padding padding\n";
    let mut text = String::from("phases:\n");
    while text.len() < 10 * 1024 * 1024 {
        text.push_str(line);
    }
    std::fs::write(&path, text).expect("write 10 MB file");
    let (code, err, took) = validate(&path);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("{}:1:1: error[file]: ", path.display()))
            && err.contains("a plan is limited to 1048576 bytes"),
        "{err}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn several_mistakes_are_all_reported_in_one_run_in_file_order() {
    let path = fixture("plans/several_mistakes.yaml");
    let (code, err, _) = validate(&path);
    assert_eq!(code, Some(2), "{err}");
    let expected = [
        (3, "duration", "lock_timeout `500` has no unit"),
        (6, "name", "`Add-Email-Hash` is not snake_case"),
        (8, "unknown-key", "unknown key `rollbak`"),
        (
            12,
            "identifier",
            "`leads; drop table users` is not a valid name",
        ),
        (19, "unknown-key", "unknown key `batchsize`"),
        (22, "sql-syntax", "check query does not parse"),
    ];
    let errors: Vec<&str> = err.lines().filter(|l| l.contains(": error[")).collect();
    assert_eq!(errors.len(), expected.len(), "{err}");
    for (line, (n, rule, says)) in errors.iter().zip(expected) {
        let prefix = format!("{}:{n}:", path.display());
        assert!(
            line.starts_with(&prefix)
                && line.contains(&format!("error[{rule}]"))
                && line.contains(says),
            "want line {n} {rule} `{says}`, got: {line}"
        );
    }
    assert!(err.contains("6 error(s); nothing was changed"), "{err}");
}

#[test]
fn json_output_has_the_documented_fields() {
    let path = fixture("plans/several_mistakes.yaml");
    let o = pgshift(&[
        "plan",
        "validate",
        "--format",
        "json",
        path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is JSON");
    assert_eq!(v["valid"], false);
    assert_eq!(v["files"][0]["valid"], false);
    let diags = v["diagnostics"].as_array().expect("diagnostics array");
    assert_eq!(diags.len(), 6, "{v:#}");
    for d in diags {
        for field in [
            "file", "line", "column", "severity", "rule", "step", "message", "help",
        ] {
            assert!(d.get(field).is_some(), "{field} missing in {d}");
        }
        assert!(d["line"].as_u64().is_some_and(|l| l > 0), "{d}");
        assert!(d["column"].as_u64().is_some_and(|c| c > 0), "{d}");
        assert_eq!(d["severity"], "error");
        assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
    }
    let first = &diags[0];
    assert_eq!(first["line"], 3);
    assert_eq!(first["column"], 17);
    assert_eq!(first["rule"], "duration");
    assert!(first["step"].is_null());
    assert_eq!(diags[1]["step"], "Add-Email-Hash");

    let good = fixture("plans/good/product_example.yaml");
    let o = pgshift(&[
        "plan",
        "validate",
        "--format",
        "json",
        good.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("stdout is JSON");
    assert_eq!(v["valid"], true);
    assert_eq!(v["files"][0]["id"], "0002_leads_email_hash");
    assert_eq!(v["files"][0]["steps"], 8);
}

/// Every `*.yaml` under `dir`, recursively (none if `dir` does not exist).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn every_good_plan_and_every_example_plan_validates() {
    let mut files = yaml_files(&fixture("plans/good"));
    assert!(!files.is_empty(), "no good fixtures found");
    files.extend(yaml_files(&project_file("plans")));
    let mut failures = Vec::new();
    for f in &files {
        let (code, err, _) = validate(f);
        if code != Some(0) {
            failures.push(format!("{} (exit {code:?}):\n{err}", f.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A valid plan of `n` steps spread over the four phases.
fn generated_plan(n: usize) -> String {
    let quarter = n / 4;
    let mut y = String::from("id: generated\nphases:\n  expand:\n");
    for i in 0..quarter {
        y.push_str(&format!(
            "    - name: add_c{i}\n      sql: ALTER TABLE t{i} ADD COLUMN IF NOT EXISTS c text\n      rollback: ALTER TABLE t{i} DROP COLUMN IF EXISTS c\n"
        ));
    }
    y.push_str("  dual_write:\n");
    for i in 0..quarter {
        y.push_str(&format!(
            "    - name: sync_c{i}\n      trigger:\n        table: t{i}\n        set: {{ c: \"lower(NEW.b)\" }}\n"
        ));
    }
    y.push_str("  backfill:\n");
    for i in 0..quarter {
        y.push_str(&format!(
            "    - name: fill_c{i}\n      backfill:\n        table: t{i}\n        set: {{ c: \"lower(b)\" }}\n        where: c IS NULL\n        batch_size: 1000\n        throttle: {{ sleep: 20ms }}\n"
        ));
    }
    y.push_str("  contract:\n    - name: deployed\n      gate: Deploy the app that reads c\n");
    for i in 0..n - 3 * quarter - 1 {
        y.push_str(&format!(
            "    - name: check_c{i}\n      check: SELECT count(*) = 0 FROM t{i} WHERE c IS NULL\n"
        ));
    }
    y
}

#[test]
fn validating_a_thousand_step_plan_takes_well_under_a_second() {
    let dir = scratch("thousand");
    let path = dir.join("generated.yaml");
    std::fs::write(&path, generated_plan(1000)).expect("write generated plan");
    let o = pgshift(&[
        "plan",
        "validate",
        "--format",
        "json",
        path.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    assert_eq!(v["files"][0]["steps"], 1000);
    // Best of three: the figure is about the validator, not a busy test machine.
    let took = (0..3).map(|_| validate(&path).2).min().unwrap_or_default();
    eprintln!("validating 1,000 steps (process start included): {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The ```yaml blocks of a Markdown file that are whole plans (start with `id:` or `phases:`).
fn plan_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some((i + 2, String::new())),
            Some(_) if line.trim_start() == "```" => {
                let (at, text) = current.take().unwrap_or_default();
                if text.starts_with("id:") || text.starts_with("phases:") {
                    out.push((at, text));
                }
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn every_plan_in_the_plan_format_reference_validates() {
    plans_in_doc_validate("docs/plan-format.md", 3);
}

#[test]
fn every_plan_in_the_readme_validates() {
    plans_in_doc_validate("README.md", 1);
}

/// Every ```yaml block of `rel` that is a plan validates with exit 0.
fn plans_in_doc_validate(rel: &str, at_least: usize) {
    let doc = project_file(rel);
    let text = std::fs::read_to_string(&doc).expect(rel);
    let blocks = plan_blocks(&text);
    assert!(
        blocks.len() >= at_least,
        "expected at least {at_least} plans in {}",
        doc.display()
    );
    let dir = scratch(&rel.replace(['/', '.'], "_"));
    let mut failures = Vec::new();
    for (line, yaml) in blocks {
        let path = dir.join(format!("plan_format_line_{line}.yaml"));
        std::fs::write(&path, yaml).expect("write block");
        let (code, err, _) = validate(&path);
        if code != Some(0) {
            failures.push(format!("the block at {rel}:{line} (exit {code:?}):\n{err}"));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
