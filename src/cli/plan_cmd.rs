//! The commands that read a plan file and touch no database: `plan validate`
//! and `plan show`; and how a plan's diagnostics are printed.

use std::path::{Path, PathBuf};

use super::output::{self, Level, Line};
use super::{Global, OutputFormat};
use crate::exit::Exit;
use crate::plan::{self, Diagnostic, Plan, Severity};

/// `plan validate FILE...`: every check, no database. An `allow`ed finding is
/// a decision already made and reviewed: it is listed only with `-v`.
pub fn validate(files: &[PathBuf], format: OutputFormat, g: &Global) -> Exit {
    let mut all = Vec::new();
    let mut failed = false;
    let mut summaries = Vec::new();
    for file in files {
        match plan::load(file) {
            Ok(p) => {
                summaries.push(serde_json::json!({"file": file, "id": p.id, "valid": true, "steps": p.steps.len()}));
                if format == OutputFormat::Human && !g.quiet {
                    let (allowed, others): (Vec<_>, Vec<_>) =
                        p.notes.iter().cloned().partition(|d| is_allowed(&p, d));
                    print_diagnostics(&others);
                    if g.verbose > 0 {
                        print_diagnostics(&allowed);
                    }
                    let quiet_note = if allowed.is_empty() || g.verbose > 0 {
                        String::new()
                    } else {
                        format!(", {} allowed finding(s): -v lists them", allowed.len())
                    };
                    let pending = if p.pending.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; generated from the live catalog when it runs, and shown by `pgshift plan show` against the database: {}",
                            p.pending.join(", ")
                        )
                    };
                    println!(
                        "ok: {} (plan `{}`, {} steps{quiet_note}{pending})",
                        file.display(),
                        p.id,
                        p.steps.len()
                    );
                }
                all.extend(p.notes);
            }
            Err(e) => {
                failed = true;
                let diags = e.diagnostics();
                summaries.push(serde_json::json!({"file": file, "valid": false}));
                if format == OutputFormat::Human {
                    print_diagnostics(&diags);
                    let n = diags
                        .iter()
                        .filter(|d| d.severity == Severity::Error)
                        .count();
                    Line::plain(
                        Level::Error,
                        "invalid_plan",
                        format!("{}: {n} error(s); nothing was changed", file.display()),
                    )
                    .field("errors", n)
                    .emit();
                }
                all.extend(diags);
            }
        }
    }
    if format == OutputFormat::Json {
        let out = serde_json::json!({
            "valid": !failed,
            "files": summaries,
            "diagnostics": all.iter().map(diagnostic_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    if failed { Exit::Invalid } else { Exit::Ok }
}

/// A warning that says "(allowed: …)": a finding the step's `allow` acknowledges.
fn is_allowed(p: &Plan, d: &Diagnostic) -> bool {
    d.severity == Severity::Warning
        && d.step
            .as_deref()
            .and_then(|s| p.step(s))
            .is_some_and(|s| s.allow.contains_key(&d.rule))
}

/// `plan show FILE` and `plan expand FILE`: offline when the plan needs no
/// catalog; else with the facts recorded at the plan's first run on the
/// database, or read from it now (read-only).
pub fn show(g: &Global, file: &Path, expand: bool) -> Exit {
    let p = match plan::load(file) {
        Ok(p) => p,
        Err(e) => {
            print_diagnostics(&e.diagnostics());
            return Exit::Invalid;
        }
    };
    let p = if p.pending.is_empty() {
        p
    } else {
        match with_catalog(g, &p) {
            Ok(full) => full,
            Err(why) => {
                super::output::Line::error(
                    "error",
                    format!(
                        "{} of plan `{}` need the live catalog to be expanded, and {why}. Point --database-url (or DATABASE_URL) at the database the plan is for; nothing is changed there",
                        p.pending.join(", "),
                        p.id,
                    ),
                )
                .emit();
                return Exit::Invalid;
            }
        }
    };
    if expand {
        print!("{}", crate::ops::yaml::emit(&p.expanded));
    } else {
        print!("{}", crate::show::render(&p));
    }
    Exit::Ok
}

/// The plan expanded with the catalog of `--database-url`: the facts recorded at
/// its first run there, or read now.
fn with_catalog(g: &Global, p: &Plan) -> Result<Plan, String> {
    let rt = super::runtime().map_err(|_| "the async runtime did not start".to_string())?;
    let url = g
        .database_url
        .clone()
        .unwrap_or_else(|| crate::db::DEFAULT_URL.to_string());
    let target = crate::db::Target::parse(&url).map_err(|e| e.to_string())?;
    let control = crate::control::Control::new(&g.control_schema);
    rt.block_on(async move {
        let c = crate::db::connect(&target)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let recorded = if control.exists_on(&c).await.unwrap_or(false) {
            control
                .last_event(&c, &p.id, "catalog_read")
                .await
                .ok()
                .flatten()
                .and_then(|(_, d)| serde_json::from_value(d.get("catalog")?.clone()).ok())
        } else {
            None
        };
        let catalog = match recorded {
            Some(c) => c,
            None => crate::exec::catalog::read(&c, &p.changes)
                .await
                .map_err(|e| format!("reading the catalog failed: {e}"))?,
        };
        crate::exec::preflight::expand(p, &catalog).map_err(|e| e.to_string())
    })
}

/// The JSON form of a diagnostic (stable: CI scripts read it).
pub fn diagnostic_json(d: &Diagnostic) -> serde_json::Value {
    serde_json::json!({
        "file": d.file,
        "line": d.pos.line,
        "column": d.pos.col,
        "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
        "rule": d.rule,
        "step": d.step,
        "message": d.message,
        "help": d.help,
    })
}

/// Each diagnostic on stderr, compiler style (or as a JSON line).
pub fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        let level = match d.severity {
            Severity::Error => Level::Error,
            Severity::Warning => Level::Warn,
        };
        let mut line = Line::plain(level, "diagnostic", d.to_string());
        if output::is_json() {
            line = line.field("diagnostic", diagnostic_json(d));
            if let Some(s) = &d.step {
                line = line.step(s);
            }
        }
        line.emit();
    }
}
