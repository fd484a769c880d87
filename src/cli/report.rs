//! What the operator sees while a plan runs: indicatif bars and spinners on a
//! terminal, plain timestamped lines otherwise (CI logs, `| tee`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::engine::{BackfillProgress, Reporter};

/// The CLI's reporter.
pub struct Terminal {
    bars: Option<MultiProgress>,
    quiet: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    spinners: HashMap<String, ProgressBar>,
    backfills: HashMap<(String, u32), ProgressBar>,
    last_line: HashMap<(String, u32), Instant>,
    /// The latest figures of each backfill worker, for the closing line without bars.
    last: HashMap<(String, u32), BackfillProgress>,
}

impl Terminal {
    /// `mode`: show bars only when stderr is a terminal (`auto`), always, or never.
    pub fn new(mode: super::ProgressMode, quiet: bool) -> Terminal {
        let on = match mode {
            super::ProgressMode::Always => true,
            super::ProgressMode::Never => false,
            super::ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let bars =
            (on && !quiet).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Terminal {
            bars,
            quiet,
            state: Mutex::new(State::default()),
        }
    }

    fn line(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

fn rate_line(p: &BackfillProgress) -> String {
    let total = p.rows_total.map(|t| format!("/~{t}")).unwrap_or_default();
    let eta = p
        .eta
        .map(|e| format!(", ETA {}", crate::duration::human(e)))
        .unwrap_or_default();
    let throttled = p
        .throttled
        .as_deref()
        .map(|t| format!(", throttled: {t}"))
        .unwrap_or_default();
    format!(
        "{}{total} rows, {:.0} rows/s, batch {}{eta}{throttled}",
        p.rows_done, p.rows_per_sec, p.batch_size
    )
}

impl Reporter for Terminal {
    fn message(&self, text: &str) {
        self.line(&format!("pgshift: {text}"));
    }

    fn lock_wait(&self, step: &str, relation: &str, attempt: u32, max: u32, blocker: Option<&str>) {
        let on = if relation.is_empty() {
            String::new()
        } else {
            format!(" on {relation}")
        };
        let text = format!(
            "waiting for lock{on} (attempt {attempt}/{max}, blocked by {})",
            blocker.unwrap_or("another session")
        );
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &self.bars {
            Some(m) => {
                let sp = st.spinners.entry(step.to_string()).or_insert_with(|| {
                    let sp = m.add(ProgressBar::new_spinner());
                    sp.set_style(
                        ProgressStyle::with_template("{spinner} {prefix}: {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    sp.set_prefix(step.to_string());
                    sp.enable_steady_tick(Duration::from_millis(120));
                    sp
                });
                sp.set_message(text);
            }
            None => {
                let key = (format!("lock:{step}"), attempt);
                if let std::collections::hash_map::Entry::Vacant(e) = st.last_line.entry(key) {
                    e.insert(Instant::now());
                    drop(st);
                    self.line(&format!("pgshift: {step}: {text}"));
                }
            }
        }
    }

    fn lock_done(&self, step: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sp) = st.spinners.remove(step) {
            sp.finish_and_clear();
        }
    }

    fn backfill(&self, step: &str, p: &BackfillProgress) {
        let key = (step.to_string(), p.worker);
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &self.bars {
            Some(m) => {
                let bar = st.backfills.entry(key).or_insert_with(|| {
                    let bar = m.add(ProgressBar::new(p.rows_total.unwrap_or(0)));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} rows {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    let prefix = if p.workers > 1 {
                        format!("{step} w{}", p.worker + 1)
                    } else {
                        step.to_string()
                    };
                    bar.set_prefix(prefix);
                    bar
                });
                if let Some(t) = p.rows_total {
                    bar.set_length(t.max(p.rows_done));
                }
                bar.set_position(p.rows_done);
                let eta = p
                    .eta
                    .map(|e| format!(" ETA {}", crate::duration::human(e)))
                    .unwrap_or_default();
                let thr = p
                    .throttled
                    .as_deref()
                    .map(|t| format!(" — throttled: {t}"))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "{:.0} rows/s, batch {}{eta}{thr}",
                    p.rows_per_sec, p.batch_size
                ));
            }
            None => {
                st.last.insert(key.clone(), p.clone());
                // A plain line every 10 seconds (and whenever the throttle reason appears).
                let due = st
                    .last_line
                    .get(&key)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
                    || p.throttled.is_some()
                        && st
                            .last_line
                            .get(&key)
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due {
                    st.last_line.insert(key, Instant::now());
                    drop(st);
                    let w = if p.workers > 1 {
                        format!(" worker {}", p.worker + 1)
                    } else {
                        String::new()
                    };
                    self.line(&format!("pgshift: {step}{w}: {}", rate_line(p)));
                }
            }
        }
    }

    fn backfill_done(&self, step: &str) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let keys: Vec<_> = st
            .backfills
            .keys()
            .filter(|(s, _)| s == step)
            .cloned()
            .collect();
        for k in keys {
            if let Some(b) = st.backfills.remove(&k) {
                b.finish();
            }
        }
        // Without bars, close with one line: how many rows, at what rate.
        let last: Vec<BackfillProgress> = st
            .last
            .iter()
            .filter(|((s, _), _)| s == step)
            .map(|(_, p)| p.clone())
            .collect();
        st.last.retain(|(s, _), _| s != step);
        drop(st);
        if self.bars.is_none() && !last.is_empty() {
            let rows: u64 = last.iter().map(|p| p.rows_done).max().unwrap_or(0);
            let rate: f64 = last.iter().map(|p| p.rows_per_sec).fold(0.0, f64::max);
            self.line(&format!(
                "pgshift: {step}: done, {rows} rows, {rate:.0} rows/s"
            ));
        }
    }
}
