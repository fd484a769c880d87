//! `pgshift fleet status`: one line per target and a total, or JSON.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value as Json, json};

use super::load_targets;
use crate::cli::{Global, StatusFormat};
use crate::exit::{Exit, ExitStatus};
use crate::fleet::run::{self, State};
use crate::fleet::{End, Target};

pub(super) fn status(
    g: &Global,
    plan: &str,
    targets_file: &Path,
    format: StatusFormat,
    watch: bool,
) -> Exit {
    let (file, resolved) = match load_targets(targets_file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let path = Path::new(plan);
    let id = if path.is_file() || plan.ends_with(".yaml") || plan.ends_with(".yml") {
        match crate::cli::load_or_report(path) {
            Ok(p) => p.id,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Invalid;
            }
        }
    } else {
        plan.to_string()
    };
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let control_schema = g.control_schema.clone();
    rt.block_on(async move {
        let (fleet, _) = match run::resolve(&file, &resolved, &control_schema).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e}");
                return e.exit();
            }
        };
        let concurrency = (file.parallel as usize).clamp(4, 32);
        let terminal = std::io::stdout().is_terminal();
        loop {
            let states = run::read_all(&fleet, &id, concurrency).await;
            let text = match format {
                StatusFormat::Json => serde_json::to_string_pretty(&status_json(
                    &id,
                    &control_schema,
                    &fleet,
                    &states,
                ))
                .unwrap_or_default(),
                StatusFormat::Table => status_table(&fleet, &states),
            };
            // Written, not printed: a closed pipe (`| head`) ends the output, not the process.
            let mut out = std::io::stdout().lock();
            if watch && terminal {
                let _ = write!(out, "\x1b[2J\x1b[H");
            }
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
            drop(out);
            if !watch {
                return Exit::Ok;
            }
            // Each refresh reads every target: at most 50 targets a second.
            let every = Duration::from_secs(2).max(Duration::from_millis(20) * fleet.len() as u32);
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Exit::Ok,
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// One target's line of `fleet status`, whatever could be read.
struct Line {
    status: String,
    step: Option<String>,
    rows: i64,
    rate: Option<f64>,
    error: Option<String>,
    runner: Option<String>,
}

fn line_of(s: &Result<State, End>) -> Line {
    match s {
        Ok(st) => Line {
            status: st.status().to_string(),
            step: st
                .current_step()
                .map(|r| format!("{} ({})", r.name, r.status)),
            rows: st.rows_done(),
            rate: st.rows_per_sec(),
            error: st.last_error().map(str::to_string),
            runner: st
                .plan
                .as_ref()
                .and_then(|p| p.runner.clone())
                .filter(|_| st.alive),
        },
        Err(e) => Line {
            status: match e {
                End::Unreachable(_) => "unreachable".into(),
                _ => "unreadable".into(),
            },
            step: None,
            rows: 0,
            rate: None,
            error: Some(e.detail()),
            runner: None,
        },
    }
}

fn status_table(fleet: &[Target], states: &[Result<State, End>]) -> String {
    let w = fleet
        .iter()
        .map(|t| t.name.chars().count())
        .max()
        .unwrap_or(6)
        .clamp(6, 40);
    let mut out = format!(
        "{:<w$}  {:<12} {:<34} {:>10} {:>9}  last error\n",
        "target", "status", "step", "rows", "rows/s"
    );
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = 0i64;
    for (t, s) in fleet.iter().zip(states) {
        let l = line_of(s);
        *by_status.entry(l.status.clone()).or_default() += 1;
        rows += l.rows;
        let mut err = l.error.unwrap_or_default().replace('\n', " ");
        if err.chars().count() > 100 {
            err = err.chars().take(99).collect::<String>() + "…";
        }
        out.push_str(&format!(
            "{:<w$}  {:<12} {:<34} {:>10} {:>9}  {err}\n",
            t.name,
            l.status,
            l.step.unwrap_or_else(|| "-".into()),
            l.rows,
            l.rate
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    out.push_str(&format!(
        "total: {} target(s): {}; {rows} rows",
        fleet.len(),
        counts.join(", ")
    ));
    out
}

fn status_json(
    plan: &str,
    control_schema: &str,
    fleet: &[Target],
    states: &[Result<State, End>],
) -> Json {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = 0i64;
    let targets: Vec<Json> = fleet
        .iter()
        .zip(states)
        .map(|(t, s)| {
            let l = line_of(s);
            *by_status.entry(l.status.clone()).or_default() += 1;
            rows += l.rows;
            let step = s.as_ref().ok().and_then(|st| st.current_step());
            json!({
                "name": t.name,
                "database": t.db.config.get_dbname(),
                "schema": t.schema,
                "control_schema": t.control_schema,
                "status": l.status,
                "step": step.map(|r| r.name.clone()),
                "step_kind": step.map(|r| r.kind.clone()),
                "step_status": step.map(|r| r.status),
                "attempts": step.map(|r| r.attempts),
                "rows_done": l.rows,
                "rows_per_sec": l.rate,
                "last_error": l.error,
                "runner": l.runner,
            })
        })
        .collect();
    json!({
        "version": 1,
        "plan": plan,
        "control_schema": control_schema,
        "targets": targets,
        "total": {"targets": fleet.len(), "rows_done": rows, "by_status": by_status},
    })
}
