//! One plan over many databases: a targets file (`targets.rs`) names them,
//! `run.rs` runs the plan on each (canary first, then at most `parallel` at
//! once, until `max_failures` stops new starts) and reads back where each stands.
//!
//! A target is tracked exactly as a single-database run is, in a control schema
//! of its own inside its own database: the fleet keeps no state of its own, so
//! `fleet resume` after a crash (or `pgshift resume` on one target) reads the
//! truth from each target. Schema-per-tenant targets share a database; each runs
//! with `search_path` set to its schema on every connection and is recorded in a
//! control schema of its own ([`tenant_control_schema`]).

pub mod run;
pub mod targets;

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::db;
use crate::exec;
use crate::exit::Exit;
use crate::ident::{MAX_IDENT_BYTES, quote_ident};

/// One place the plan runs: a database, or a tenant schema in one.
#[derive(Debug, Clone)]
pub struct Target {
    /// How every message and `fleet status` name it.
    pub name: String,
    /// Where to connect (for a tenant schema, with its `search_path` set).
    pub db: db::Target,
    /// Schema-per-tenant: the tenant's schema.
    pub schema: Option<String>,
    /// The control schema recording the plan on this target.
    pub control_schema: String,
}

impl Target {
    /// A target that is a whole database, recorded in `control_schema` there.
    pub fn database(name: &str, db: db::Target, control_schema: &str) -> Target {
        Target {
            name: name.to_string(),
            db,
            schema: None,
            control_schema: control_schema.to_string(),
        }
    }

    /// A tenant schema in `db`: every connection runs with `search_path` set to
    /// it, and the plan is recorded in a control schema of the tenant's own.
    pub fn tenant(name: &str, db: &db::Target, schema: &str, control_base: &str) -> Target {
        Target {
            name: name.to_string(),
            db: with_search_path(db, schema),
            schema: Some(schema.to_string()),
            control_schema: tenant_control_schema(control_base, schema),
        }
    }
}

/// The control schema of tenant `schema`: `<base>_<schema>`, or, when that is
/// longer than PostgreSQL's 63 bytes, cut and ended with a hash of the full
/// name, so that two long tenant names never share one.
///
/// It sits beside the tenant's schema, not in it: the control tables (`plans`,
/// `steps`, …) must never collide with the application's own tables, and
/// dropping a tenant's schema must not silently drop the record of what ran.
pub fn tenant_control_schema(base: &str, schema: &str) -> String {
    let full = format!("{base}_{schema}");
    if full.len() <= MAX_IDENT_BYTES {
        return full;
    }
    let hash = Sha256::digest(full.as_bytes());
    let hex: String = hash.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut cut = MAX_IDENT_BYTES - 1 - hex.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hex}", &full[..cut])
}

/// `target` with `search_path` set to `schema` on every connection it opens.
///
/// Through the startup packet's `options` (`-c search_path=…`), so it holds for
/// the pool, the lock connection and every backfill worker alike, ranks above
/// any `ALTER ROLE/DATABASE … SET search_path`, and never leaks between tenants
/// the way a `SET` on a pooled connection would. Only the tenant's schema is on
/// the path (`pg_catalog` is always searched first): with `public` after it, a
/// table missing from one tenant would silently resolve to `public`'s.
pub fn with_search_path(target: &db::Target, schema: &str) -> db::Target {
    let mut t = target.clone();
    // The value is a quoted identifier; in `options`, a backslash escapes the
    // next character and unescaped whitespace separates arguments.
    let mut value = String::new();
    for c in quote_ident(schema).chars() {
        if c == '\\' || c.is_whitespace() {
            value.push('\\');
        }
        value.push(c);
    }
    let setting = format!("-c search_path={value}");
    let options = match t.config.get_options() {
        Some(existing) if !existing.trim().is_empty() => format!("{existing} {setting}"),
        _ => setting,
    };
    t.config.options(&options);
    t.display = format!("{} (schema {})", t.display, quote_ident(schema));
    t
}

/// How one target's run ended (or why it did not run).
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// The plan finished on it in this run.
    Done,
    /// The plan had already finished there; nothing ran.
    AlreadyDone,
    /// Waits at a gate (reached now, or already waiting and not passed).
    Gate { step: String, message: String },
    /// Stopped resumably: interrupt, pause, lost connection.
    Interrupted(String),
    /// Never started: the canary failed, `max_failures` was reached, or an interrupt.
    NotStarted(String),
    /// The target could not be reached.
    Unreachable(String),
    /// A step failed (or the target cannot run the plan as it is).
    Failed(String),
    /// Another runner holds the plan there.
    Held(String),
    /// The plan file changed since the plan started there.
    Changed(String),
    /// The plan is invalid for this target (a usage error).
    Invalid(String),
    /// Rolled back in this run.
    RolledBack,
    /// Nothing to roll back: the plan never ran there, or was rolled back already.
    NothingToRollBack,
}

impl End {
    /// The exit code this end would give a single-database command.
    pub fn exit(&self) -> Exit {
        match self {
            End::Done | End::AlreadyDone | End::RolledBack | End::NothingToRollBack => Exit::Ok,
            End::Gate { .. } | End::Interrupted(_) | End::NotStarted(_) | End::Unreachable(_) => {
                Exit::Resumable
            }
            End::Held(_) => Exit::Locked,
            End::Changed(_) => Exit::PlanChanged,
            End::Failed(_) => Exit::StepFailed,
            End::Invalid(_) => Exit::Invalid,
        }
    }

    /// True when it counts toward `max_failures`: the target is down, failed,
    /// is held by another runner, or cannot run the plan.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            End::Unreachable(_) | End::Failed(_) | End::Held(_) | End::Changed(_) | End::Invalid(_)
        )
    }

    /// True when a canary ending so lets the rest of the fleet start: the plan
    /// finished there or waits at its gate.
    pub fn canary_passed(&self) -> bool {
        matches!(self, End::Done | End::AlreadyDone | End::Gate { .. })
    }

    /// A short word for summaries and `fleet status`.
    pub fn label(&self) -> &'static str {
        match self {
            End::Done => "done",
            End::AlreadyDone => "already done",
            End::Gate { .. } => "at gate",
            End::Interrupted(_) => "interrupted",
            End::NotStarted(_) => "not started",
            End::Unreachable(_) => "unreachable",
            End::Failed(_) => "failed",
            End::Held(_) => "held by another runner",
            End::Changed(_) => "plan changed",
            End::Invalid(_) => "invalid",
            End::RolledBack => "rolled back",
            End::NothingToRollBack => "nothing to roll back",
        }
    }

    /// What happened, in one line (without the target's name or the next command).
    pub fn detail(&self) -> String {
        match self {
            End::Gate { step, message } => format!("waits at gate `{step}`: {message}"),
            End::Interrupted(m)
            | End::NotStarted(m)
            | End::Unreachable(m)
            | End::Failed(m)
            | End::Held(m)
            | End::Changed(m)
            | End::Invalid(m) => m.clone(),
            other => other.label().to_string(),
        }
    }
}

/// How bad an exit code is, for "the worst of the targets'":
/// `0 < 3 < 4 < 5 < 1 < 2`. Ordered by what the operator must do: nothing;
/// run `fleet resume` (gate, interrupt, unreachable, not started); find the
/// other runner; review a changed plan file; fix a failed step; fix the input.
pub fn severity(e: Exit) -> u8 {
    match e {
        Exit::Ok => 0,
        Exit::Resumable => 1,
        Exit::Locked => 2,
        Exit::PlanChanged => 3,
        Exit::StepFailed => 4,
        Exit::Invalid => 5,
    }
}

/// The worst exit code of `ends` (0 when there are none).
pub fn worst<'a>(ends: impl IntoIterator<Item = &'a End>) -> Exit {
    ends.into_iter()
        .map(End::exit)
        .max_by_key(|e| severity(*e))
        .unwrap_or(Exit::Ok)
}

/// Where the fleet reports what each target does; the CLI draws it.
pub trait Events: Send + Sync {
    /// The reporter that target `name`'s own run reports to (every line it
    /// draws names the target).
    fn target(&self, name: &str) -> Arc<dyn exec::Reporter>;
    /// Target `name` starts (its state is read, then the plan runs).
    fn started(&self, name: &str);
    /// Target `name` ended so.
    fn ended(&self, name: &str, end: &End);
    /// A line about the whole fleet.
    fn message(&self, text: &str);
}

/// Events that go nowhere (tests, `--quiet`).
pub struct Quiet;

impl Events for Quiet {
    fn target(&self, _: &str) -> Arc<dyn exec::Reporter> {
        Arc::new(exec::Silent)
    }
    fn started(&self, _: &str) {}
    fn ended(&self, _: &str, _: &End) {}
    fn message(&self, _: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_schemas_of_tenants_are_short_distinct_and_stable() {
        assert_eq!(
            tenant_control_schema("pgshift", "tenant_01"),
            "pgshift_tenant_01"
        );
        let long_a = format!("tenant_{}_a", "x".repeat(60));
        let long_b = format!("tenant_{}_b", "x".repeat(60));
        let a = tenant_control_schema("pgshift", &long_a);
        let b = tenant_control_schema("pgshift", &long_b);
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, tenant_control_schema("pgshift", &long_a));
        // Multi-byte names are cut on a character boundary.
        let c = tenant_control_schema("pgshift", &"é".repeat(40));
        assert!(c.len() <= 63, "{c}");
    }

    #[test]
    fn search_path_is_quoted_and_escaped_for_the_startup_options() {
        let t = db::Target::parse("postgres://u:pw@h/app").unwrap();
        let s = with_search_path(&t, "Tenant \"A\" b\\c");
        assert_eq!(
            s.config.get_options(),
            Some(r#"-c search_path="Tenant\ ""A""\ b\\c""#)
        );
        assert!(!s.display.contains("pw"), "{}", s.display);
        let o =
            db::Target::parse("postgres://u@h/app?options=-c%20statement_timeout%3D5s").unwrap();
        let s = with_search_path(&o, "t1");
        assert_eq!(
            s.config.get_options(),
            Some(r#"-c statement_timeout=5s -c search_path="t1""#)
        );
    }

    #[test]
    fn the_worst_exit_follows_the_documented_order() {
        let f = |m: &str| End::Failed(m.into());
        assert_eq!(worst(&[]), Exit::Ok);
        assert_eq!(worst(&[End::Done, End::AlreadyDone]), Exit::Ok);
        assert_eq!(
            worst(&[End::Done, End::Unreachable("x".into())]),
            Exit::Resumable
        );
        assert_eq!(
            worst(&[End::Held("x".into()), End::Unreachable("x".into())]),
            Exit::Locked
        );
        assert_eq!(
            worst(&[End::Held("x".into()), End::Changed("x".into())]),
            Exit::PlanChanged
        );
        assert_eq!(
            worst(&[f("x"), End::Changed("x".into()), End::Done]),
            Exit::StepFailed
        );
        assert_eq!(worst(&[f("x"), End::Invalid("x".into())]), Exit::Invalid);
    }
}
