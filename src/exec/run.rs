//! Shell commands: `run` steps, `run:` rollbacks and hooks.
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

use crate::plan::Command;

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
                "was killed after its timeout of {}",
                crate::plan::duration::format(timeout)
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
