//! What the operator sees while a fleet runs: on a terminal one line per
//! running target and an overall bar, off a terminal one line per event.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Next;
use crate::cli::ProgressMode;
use crate::exec::{self, BackfillProgress};
use crate::fleet::{End, Events};

/// What the operator sees while a fleet runs.
pub(super) struct View {
    inner: Arc<Inner>,
}

struct Inner {
    bars: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    quiet: bool,
    total: usize,
    next: Next,
    state: Mutex<ViewState>,
}

#[derive(Default)]
struct ViewState {
    lines: HashMap<String, ProgressBar>,
    running: usize,
    ended: usize,
    failed: usize,
    /// Rows done by each (target, backfill step) (as `fleet status` counts
    /// them: a resumed step's earlier rows included), and its current rate.
    rows: HashMap<(String, String), (u64, f64)>,
    last_line: HashMap<(String, String, u32), Instant>,
    last: HashMap<(String, String, u32), BackfillProgress>,
}

impl View {
    pub(super) fn new(mode: ProgressMode, quiet: bool, total: usize, next: Next) -> View {
        let on = match mode {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let bars =
            (on && !quiet).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = bars.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total as u64));
            b.set_style(
                ProgressStyle::with_template(
                    "fleet [{bar:30}] {pos}/{len} targets ended ({elapsed}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        View {
            inner: Arc::new(Inner {
                bars,
                overall,
                quiet,
                total,
                next,
                state: Mutex::new(ViewState::default()),
            }),
        }
    }

    pub(super) fn finish(&self) {
        let mut st = self.inner.state();
        for (_, l) in st.lines.drain() {
            l.finish_and_clear();
        }
        if let Some(o) = &self.inner.overall {
            o.finish();
        }
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn overall(&self, st: &ViewState) {
        if let Some(o) = &self.overall {
            let rows: u64 = st.rows.values().map(|(r, _)| r).sum();
            // A fold from +0.0: an empty f64 sum is -0.0, printed "-0".
            let rate = st.rows.values().fold(0.0, |a, (_, r)| a + r);
            o.set_position(st.ended as u64);
            o.set_message(format!(
                "· {} running · {} failed · {rows} rows · {rate:.0} rows/s",
                st.running, st.failed
            ));
        }
    }

    /// Sets the running target's own line (terminal) or prints one (off a terminal).
    fn target_line(&self, name: &str, text: &str, print_off_terminal: bool) {
        if self.bars.is_some() {
            if let Some(l) = self.state().lines.get(name) {
                l.set_message(text.to_string());
            }
        } else if print_off_terminal && !self.quiet {
            eprintln!("[{name}] {text}");
        }
    }
}

impl Events for View {
    fn target(&self, name: &str) -> Arc<dyn exec::Reporter> {
        Arc::new(TargetView {
            name: name.to_string(),
            inner: self.inner.clone(),
        })
    }

    fn started(&self, name: &str) {
        let mut st = self.inner.state();
        st.running += 1;
        if let (Some(m), Some(o)) = (&self.inner.bars, &self.inner.overall) {
            let l = m.insert_before(o, ProgressBar::new_spinner());
            l.set_style(
                ProgressStyle::with_template("{spinner} [{prefix}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            l.set_prefix(name.to_string());
            l.set_message("connecting");
            l.enable_steady_tick(Duration::from_millis(120));
            st.lines.insert(name.to_string(), l);
        }
        self.inner.overall(&st);
    }

    fn ended(&self, name: &str, end: &End) {
        let mut st = self.inner.state();
        st.running = st.running.saturating_sub(1);
        st.ended += 1;
        if end.is_failure() {
            st.failed += 1;
        }
        if let Some(l) = st.lines.remove(name) {
            l.finish_and_clear();
        }
        for v in st.rows.iter_mut().filter(|((t, _), _)| t == name) {
            v.1.1 = 0.0;
        }
        self.inner.overall(&st);
        let ended = st.ended;
        drop(st);
        let next = &self.inner.next;
        let text = match end {
            End::Done => "done".to_string(),
            End::AlreadyDone => "already done; nothing ran".to_string(),
            End::Gate { step, .. } => format!("waits at gate `{step}`"),
            End::Interrupted(m) => format!("interrupted: {m}; continue with `{}`", next.resume()),
            End::NotStarted(m) => format!("not started: {m}"),
            End::Unreachable(m) => format!(
                "unreachable: {m}; once it answers, `{}` continues it",
                next.resume()
            ),
            End::Failed(m) => format!("failed: {m}; fix the cause, then `{}`", next.resume()),
            End::Held(m) => format!(
                "held: {m}; when that run ends, `{}` continues it",
                next.resume()
            ),
            End::Changed(m) => format!("{m} (`{} --accept-changed` after review)", next.resume()),
            End::Invalid(m) => format!("cannot run the plan: {m}"),
            End::RolledBack => "rolled back".to_string(),
            End::NothingToRollBack => "nothing to roll back: the plan has not run here".to_string(),
        };
        let bad = end.is_failure() || matches!(end, End::Interrupted(_));
        let quiet_ok = self.inner.quiet && !bad;
        // On a terminal, targets that went well show in the overall bar only.
        let terminal_ok = self.inner.bars.is_some() && !bad;
        if !quiet_ok && !terminal_ok {
            self.inner.line(&format!(
                "[{name}] {text} [{ended}/{} ended]",
                self.inner.total
            ));
        }
    }

    fn message(&self, text: &str) {
        if !self.inner.quiet {
            self.inner.line(&format!("pgshift: fleet: {text}"));
        }
    }
}

/// The reporter of one target's run: every line names the target.
struct TargetView {
    name: String,
    inner: Arc<Inner>,
}

impl exec::Reporter for TargetView {
    fn message(&self, text: &str) {
        self.inner.target_line(&self.name, text, true);
    }

    fn lock_wait(&self, step: &str, relation: &str, attempt: u32, max: u32, blocker: Option<&str>) {
        let on = if relation.is_empty() {
            String::new()
        } else {
            format!(" on {relation}")
        };
        self.inner.target_line(
            &self.name,
            &format!(
                "{step}: waiting for lock{on} (attempt {attempt}/{max}, blocked by {})",
                blocker.unwrap_or("another session")
            ),
            true,
        );
    }

    fn lock_done(&self, _: &str) {}

    fn backfill(&self, step: &str, p: &BackfillProgress) {
        let key = (self.name.clone(), step.to_string());
        let mut st = self.inner.state();
        let e = st.rows.entry(key).or_insert((0, 0.0));
        e.0 = e.0.max(p.rows_done);
        e.1 = p.rows_per_sec;
        self.inner.overall(&st);
        let total = p.rows_total.map(|t| format!("/~{t}")).unwrap_or_default();
        let text = format!(
            "{step}: {}{total} rows, {:.0} rows/s, batch {}{}",
            p.rows_done,
            p.rows_per_sec,
            p.batch_size,
            p.throttled
                .as_deref()
                .map(|t| format!(", throttled: {t}"))
                .unwrap_or_default()
        );
        if self.inner.bars.is_some() {
            if let Some(l) = st.lines.get(&self.name) {
                l.set_message(text);
            }
            return;
        }
        // Off a terminal: a line every 10 seconds per target and step.
        let k = (self.name.clone(), step.to_string(), p.worker);
        st.last.insert(k.clone(), p.clone());
        let due = st
            .last_line
            .get(&k)
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            st.last_line.insert(k, Instant::now());
            drop(st);
            self.inner.target_line(&self.name, &text, true);
        }
    }

    fn backfill_done(&self, step: &str) {
        let mut st = self.inner.state();
        if let Some(v) = st.rows.get_mut(&(self.name.clone(), step.to_string())) {
            v.1 = 0.0;
        }
        let last: Vec<BackfillProgress> = st
            .last
            .iter()
            .filter(|((t, s, _), _)| t == &self.name && s == step)
            .map(|(_, p)| p.clone())
            .collect();
        st.last
            .retain(|(t, s, _), _| !(t == &self.name && s == step));
        drop(st);
        if !last.is_empty() {
            let rows = last.iter().map(|p| p.rows_done).max().unwrap_or(0);
            let rate = last.iter().map(|p| p.rows_per_sec).fold(0.0, f64::max);
            self.inner.target_line(
                &self.name,
                &format!("{step}: done, {rows} rows, {rate:.0} rows/s"),
                true,
            );
        }
    }
}
