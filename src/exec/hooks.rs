//! The plan's hooks: `before`/`after` a phase guard it (a failure stops the
//! plan), `on_gate`/`on_failure`/`on_success` notify (a failure is recorded and
//! never hides the outcome it reports).

use crate::control::Event;
use crate::control::types::HookRun;
use crate::db;
use crate::engine::{Context, Error};
use crate::kind::run::{self, Command};
use crate::plan::{Phase, Plan};

/// What a notification hook is told: where the plan stands.
pub struct Notice<'a> {
    pub phase: Option<Phase>,
    pub step: Option<&'a str>,
    pub status: &'a str,
    pub error: Option<&'a str>,
}

async fn record(cx: &Context, plan: &Plan, step: Option<&str>, event: &Event) {
    if let Ok(c) = db::get(&cx.pool, &cx.target).await {
        let _ = cx.control.event(&**c, &plan.id, step, event).await;
    }
}

/// Phase hooks (`before.<phase>`, `after.<phase>`): a failure stops the plan.
pub async fn guard(
    cx: &Context,
    plan: &Plan,
    cmds: &[Command],
    name: &str,
    phase: Phase,
) -> Result<(), Error> {
    for cmd in cmds {
        let vars = run::env(&plan.id, phase.as_str(), None, "running", None);
        let ran = run::run(cmd, &vars, &cx.cancel)
            .await
            .map_err(|e| Error::Hook {
                hook: name.to_string(),
                message: e.to_string(),
            })?;
        let hook = HookRun {
            hook: name.to_string(),
            command: cmd.command.clone(),
            code: ran.code,
            output: ran.tail.clone(),
        };
        record(cx, plan, None, &Event::Hook(hook)).await;
        if ran.cancelled {
            return Err(Error::Cancelled {
                step: format!("hook {name}"),
            });
        }
        if !ran.success() {
            return Err(Error::Hook {
                hook: name.to_string(),
                message: ran.failure(&cmd.command, cmd.timeout),
            });
        }
    }
    Ok(())
}

/// Notification hooks: a failure is recorded as an event and said, never more.
pub async fn notify(cx: &Context, plan: &Plan, cmds: &[Command], name: &str, notice: Notice<'_>) {
    for cmd in cmds {
        let phase = notice.phase.map(Phase::as_str).unwrap_or_default();
        let vars = run::env(&plan.id, phase, notice.step, notice.status, notice.error);
        let ran = run::run(cmd, &vars, &tokio_util::sync::CancellationToken::new()).await;
        let (code, output, ok) = match &ran {
            Ok(r) => (r.code, r.tail.clone(), r.success()),
            Err(e) => (None, e.to_string(), false),
        };
        let hook = HookRun {
            hook: name.to_string(),
            command: cmd.command.clone(),
            code,
            output,
        };
        let event = if ok {
            Event::Hook(hook)
        } else {
            Event::HookFailed(hook)
        };
        record(cx, plan, notice.step, &event).await;
        if !ok {
            cx.reporter.message(&format!(
                "hook {name} (`{}`) failed; see `pgshift status {}` events",
                cmd.command, plan.id
            ));
        }
    }
}
