//! The `run` step kind, and every shell command a plan can give: `run` steps,
//! `run:` rollbacks and hooks.
//!
//! A command runs under `sh -c` with a clean environment: `PATH`, `HOME`,
//! `LANG`, `TERM`, `USER`, the `PGSHIFT_*` variables, what the plan sets in
//! `env`, and the variables it names in `pass_env`. Nothing else of pgshift's
//! environment (a `DATABASE_URL` with a password, cloud credentials) reaches it
//! unless the plan says so. A command that outlives its timeout is killed with
//! its whole process group.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::control::Event;
use crate::control::types::CommandOutput;
use crate::engine::{Error, Outcome, StepCx};
use crate::plan::defaults;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;

/// The kind's key in the plan file.
pub const KEY: &str = "run";

/// A `run` step or a `run:` rollback that runs longer is killed.
pub const TIMEOUT: Duration = defaults::RUN_TIMEOUT;

/// A shell command: a `run` step, a `run:` rollback, or a hook.
#[derive(Debug, Clone)]
pub struct Command {
    pub command: String,
    pub timeout: Duration,
    /// Extra environment the plan passes explicitly.
    pub env: BTreeMap<String, String>,
    /// Variables of pgshift's own environment the plan lets through (nothing else is).
    pub pass_env: Vec<String>,
}

/// Why a command runs, for its event and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Step,
    Rollback,
}

/// How a command ended.
#[derive(Debug, Clone)]
pub struct Ran {
    /// The exit code; `None` when killed (timeout, interrupt, signal).
    pub code: Option<i32>,
    pub timed_out: bool,
    pub cancelled: bool,
    /// The last lines of stdout and stderr, interleaved by stream.
    pub tail: String,
    pub elapsed: Duration,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// One sentence about a failure, with the output's tail.
    pub fn failure(&self, command: &str, timeout: Duration) -> String {
        let how = if self.timed_out {
            format!(
                "was killed with its process group after its timeout of {} (raise the step's `timeout` if it needs longer)",
                crate::duration::format(timeout)
            )
        } else if self.cancelled {
            "was interrupted".to_string()
        } else {
            match self.code {
                Some(c) => format!("exited with code {c}"),
                None => "was killed by a signal".to_string(),
            }
        };
        if self.tail.trim().is_empty() {
            format!("command `{command}` {how} (no output)")
        } else {
            format!(
                "command `{command}` {how}; last output:\n{}",
                self.tail.trim_end()
            )
        }
    }
}

/// Reads a command: a string, or a map with `command`, `timeout`, `env`, `pass_env`.
pub fn parse_command(
    r: &mut Reader,
    node: &Node,
    what: &str,
    default_timeout: Duration,
) -> Option<Command> {
    match &node.value {
        Value::Str(_) => Some(Command {
            command: r.string(node, what)?,
            timeout: default_timeout,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
        }),
        Value::Map(_) => {
            let mut cmd = Command {
                command: String::new(),
                timeout: default_timeout,
                env: BTreeMap::new(),
                pass_env: Vec::new(),
            };
            let mut ok = true;
            for (key, _, val) in r.entries(node, what, &["command", "timeout", "env", "pass_env"]) {
                match key.as_str() {
                    "command" => match r.string(val, &format!("{what}'s command")) {
                        Some(c) => cmd.command = c,
                        None => ok = false,
                    },
                    "timeout" => match r.duration(val, "timeout") {
                        Some(d) => cmd.timeout = d,
                        None => ok = false,
                    },
                    "env" => {
                        for (k, kn, vn) in r.entries(val, "env", &[]) {
                            if !is_env_name(&k) {
                                r.error(
                                    kn.pos,
                                    "env",
                                    format!("`{k}` is not a valid environment variable name"),
                                    Some(
                                        "use letters, digits and `_`, not starting with a digit"
                                            .into(),
                                    ),
                                );
                                ok = false;
                            }
                            let v = match &vn.value {
                                Value::Null => String::new(),
                                _ => r.string(vn, &format!("env `{k}`")).unwrap_or_default(),
                            };
                            cmd.env.insert(k, v);
                        }
                    }
                    "pass_env" => match &val.value {
                        Value::Seq(items) => {
                            for item in items {
                                if let Some(name) = r.string(item, "pass_env entry") {
                                    cmd.pass_env.push(name);
                                }
                            }
                        }
                        other => {
                            r.error(
                                val.pos,
                                "type",
                                format!(
                                    "pass_env must be a list of variable names, not {}",
                                    other.describe()
                                ),
                                None,
                            );
                            ok = false;
                        }
                    },
                    _ => {}
                }
            }
            if cmd.command.is_empty() {
                r.error(
                    node.pos,
                    "missing",
                    format!("{what} has no `command`"),
                    None,
                );
                ok = false;
            }
            ok.then_some(cmd)
        }
        other => {
            r.error(node.pos, "type", format!("{what} must be a shell command (a string) or a map with `command`, `timeout`, `env`, not {}", other.describe()), None);
            None
        }
    }
}

/// Reads one hook command or a list of them.
pub fn parse_commands(r: &mut Reader, node: &Node, what: &str) -> Vec<Command> {
    match &node.value {
        Value::Seq(items) => items
            .iter()
            .filter_map(|i| parse_command(r, i, what, defaults::HOOK_TIMEOUT))
            .collect(),
        _ => parse_command(r, node, what, defaults::HOOK_TIMEOUT)
            .into_iter()
            .collect(),
    }
}

fn is_env_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `$ command` and its timeout, as `plan show` prints it.
pub fn describe(c: &Command) -> String {
    format!(
        "$ {}\n(timeout {})",
        c.command,
        crate::duration::format(c.timeout)
    )
}

/// The `PGSHIFT_*` variables a command gets.
pub fn env(
    plan: &str,
    phase: &str,
    step: Option<&str>,
    status: &str,
    error: Option<&str>,
) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("PGSHIFT_PLAN".to_string(), plan.to_string());
    v.insert("PGSHIFT_PHASE".to_string(), phase.to_string());
    v.insert(
        "PGSHIFT_STEP".to_string(),
        step.unwrap_or_default().to_string(),
    );
    v.insert("PGSHIFT_STATUS".to_string(), status.to_string());
    v.insert(
        "PGSHIFT_ERROR".to_string(),
        error.unwrap_or_default().to_string(),
    );
    v
}

/// Runs a `run` step (or a `run:` rollback): its output goes to the events log.
pub async fn execute(sx: &StepCx, cmd: &Command, purpose: Purpose) -> Result<Outcome, Error> {
    let vars = env(&sx.plan, sx.phase, Some(&sx.step), "running", None);
    let ran = run(cmd, &vars, &sx.cx.cancel)
        .await
        .map_err(|e| Error::Command {
            step: sx.step.clone(),
            message: format!("cannot start `{}`: {e}", cmd.command),
        })?;
    let output = CommandOutput {
        command: cmd.command.clone(),
        code: ran.code,
        timed_out: ran.timed_out,
        elapsed_ms: ran.elapsed.as_millis() as u64,
        output: ran.tail.clone(),
    };
    sx.note(&match purpose {
        Purpose::Step => Event::RunOutput(output),
        Purpose::Rollback => Event::RollbackOutput(output),
    })
    .await;
    if ran.cancelled {
        return Ok(Outcome::Cancelled);
    }
    if !ran.success() {
        return Err(Error::Command {
            step: sx.step.clone(),
            message: ran.failure(&cmd.command, cmd.timeout),
        });
    }
    Ok(Outcome::Done)
}

const KEEP: [&str; 5] = ["PATH", "HOME", "LANG", "TERM", "USER"];
const TAIL_LINES: usize = 20;

/// Runs `cmd` with the `PGSHIFT_*` variables in `vars`, until it exits, times out or `cancel` fires.
pub async fn run(
    cmd: &Command,
    vars: &BTreeMap<String, String>,
    cancel: &CancellationToken,
) -> std::io::Result<Ran> {
    let started = std::time::Instant::now();
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(&cmd.command)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for k in KEEP {
        if let Ok(v) = std::env::var(k) {
            c.env(k, v);
        }
    }
    for k in &cmd.pass_env {
        if let Ok(v) = std::env::var(k) {
            c.env(k, v);
        }
    }
    for (k, v) in vars.iter().chain(cmd.env.iter()) {
        c.env(k, v);
    }
    // Its own process group, so that a timeout kills the children of `sh` too.
    c.process_group(0);
    let mut child = c.spawn()?;
    let pid = child.id();
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let read_out = tokio::spawn(async move {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b).await;
        b
    });
    let read_err = tokio::spawn(async move {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b).await;
        b
    });
    let mut timed_out = false;
    let mut cancelled = false;
    let status = tokio::select! {
        s = child.wait() => Some(s?),
        _ = tokio::time::sleep(cmd.timeout) => { timed_out = true; None }
        _ = cancel.cancelled() => { cancelled = true; None }
    };
    let code = match status {
        Some(s) => s.code(),
        None => {
            if let Some(pid) = pid {
                // The child leads its own process group (process_group(0) above), so a
                // negative pid reaches `sh` and everything it started.
                // SAFETY: kill(2) has no memory effects; the worst a stale pid can do is fail.
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGKILL);
                }
            }
            let _ = child.kill().await;
            None
        }
    };
    let stdout = read_out.await.unwrap_or_default();
    let stderr = read_err.await.unwrap_or_default();
    Ok(Ran {
        code,
        timed_out,
        cancelled,
        tail: tail(&stdout, &stderr),
        elapsed: started.elapsed(),
    })
}

fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for (name, bytes) in [("stdout", stdout), ("stderr", stderr)] {
        let text = String::from_utf8_lossy(bytes);
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(TAIL_LINES);
        for l in &all[start..] {
            lines.push(format!("[{name}] {l}"));
        }
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: &str, timeout_ms: u64) -> Command {
        Command {
            command: c.into(),
            timeout: Duration::from_millis(timeout_ms),
            env: BTreeMap::new(),
            pass_env: vec![],
        }
    }

    #[tokio::test]
    async fn exit_code_and_output_tail() {
        let r = run(
            &cmd("echo hello; echo oops >&2; exit 7", 5000),
            &BTreeMap::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.code, Some(7));
        assert!(
            r.tail.contains("[stdout] hello") && r.tail.contains("[stderr] oops"),
            "{}",
            r.tail
        );
        assert!(
            r.failure("x", Duration::from_secs(1))
                .contains("exited with code 7")
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let r = run(
            &cmd("sleep 30 & sleep 30", 300),
            &BTreeMap::new(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(r.timed_out && r.code.is_none());
        assert!(r.elapsed < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn environment_is_clean_unless_passed() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("PGSHIFT_TEST_SECRET", "hunter2") };
        let mut vars = BTreeMap::new();
        vars.insert("PGSHIFT_STEP".to_string(), "s1".to_string());
        let r = run(
            &cmd("echo \"[$PGSHIFT_TEST_SECRET][$PGSHIFT_STEP]\"", 5000),
            &vars,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(r.tail.contains("[][s1]"), "{}", r.tail);
        let mut c = cmd("echo \"[$PGSHIFT_TEST_SECRET]\"", 5000);
        c.pass_env.push("PGSHIFT_TEST_SECRET".into());
        let r = run(&c, &vars, &CancellationToken::new()).await.unwrap();
        assert!(r.tail.contains("[hunter2]"), "{}", r.tail);
    }
}
