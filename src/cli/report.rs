//! What the operator sees while a plan runs: on a terminal, indicatif bars and
//! spinners (two short lines each, so they never wrap at 80 columns); otherwise
//! plain lines, or JSON lines with `--log-format json` (see `output`).
//!
//! A backfill's bar ends as one line that stays in the scrollback: frozen where
//! it stopped ("interrupted at 690000/1000000 (69 %)"), or the run's figures
//! ("done: 1000000 rows in 4m12s, 3968 rows/s").

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::{self, Line};
use crate::duration::human;
use crate::engine::{BackfillProgress, Reporter, StepEnd, StepStart};

/// Width of the drawn part of a bar.
const BAR_WIDTH: usize = 20;
/// Longest step name in front of a bar.
const PREFIX_WIDTH: usize = 24;
/// Without bars, a progress line at most this often (and when the throttle reason changes).
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Steps begun in this process, for "did anything run" (the demo, `backfill`).
static STEPS_STARTED: AtomicUsize = AtomicUsize::new(0);

/// How many steps (or undos) have begun in this process so far.
pub fn steps_started() -> usize {
    STEPS_STARTED.load(Ordering::SeqCst)
}

/// The CLI's reporter.
pub struct Terminal {
    bars: Option<MultiProgress>,
    /// Set by the signal handler: a backfill that ends now was interrupted.
    interrupted: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The step running now, when it started, and its rows before this run.
    current: Option<(String, Instant, u64)>,
    spinners: HashMap<String, ProgressBar>,
    backfills: HashMap<String, Backfill>,
    /// Lock waits already reported without a spinner: (step, attempt).
    lock_lines: HashSet<(String, u32)>,
}

/// One backfill step as shown: its bar (on a terminal) and its latest figures.
struct Backfill {
    bar: Option<ProgressBar>,
    last: BackfillProgress,
    started: Instant,
    rows_before: u64,
    last_line: Option<Instant>,
    reason: Option<String>,
}

impl Terminal {
    /// `mode`: bars only when stderr is a terminal (`auto`), always, or never.
    /// JSON logs and `-q` never draw bars.
    pub fn new(mode: super::ProgressMode, quiet: bool) -> Terminal {
        let on = match mode {
            super::ProgressMode::Always => true,
            super::ProgressMode::Never => false,
            super::ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            // `--progress always` off a terminal: indicatif would hide the bars
            // (and every line printed above them), so draw them on stderr as it is.
            ProgressDrawTarget::term_like_with_hz(Box::new(Stderr), 20)
        };
        let bars =
            (on && !quiet && !output::is_json()).then(|| MultiProgress::with_draw_target(target));
        output::set_bars(bars.clone());
        Terminal {
            bars,
            interrupted: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    /// The operator interrupted the run: a backfill that stops now stopped for that.
    pub fn interrupted(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends a backfill's display with its closing line.
    fn close_backfill(&self, step: &str, end: StepEnd) {
        let Some(b) = self.state().backfills.remove(step) else {
            return;
        };
        let p = &b.last;
        let text = closing_text(p, end, b.started.elapsed(), b.rows_before);
        let line = Line::info("backfill_ended", format!("{step}: {text}"))
            .step(step)
            .field("end", format!("{end:?}").to_lowercase())
            .field("rows_done", p.rows_done)
            .field("rows_total", p.rows_total)
            .field("rows_this_run", p.rows_done.saturating_sub(b.rows_before))
            .field("secs", b.started.elapsed().as_secs_f64());
        match (&b.bar, &self.bars) {
            (Some(bar), Some(m)) => {
                bar.finish_and_clear();
                m.remove(bar);
                let fraction = match (end, p.rows_total) {
                    (StepEnd::Done, _) => 1.0,
                    (_, Some(t)) if t > 0 => (p.rows_done as f64 / t as f64).min(1.0),
                    _ => 0.0,
                };
                let drawn = format!(
                    "{} [{}] {text}",
                    prefix(step),
                    static_bar(fraction, BAR_WIDTH)
                );
                // The frozen bar if it fits the terminal, else the words alone.
                let shown = if drawn.chars().count() < term_width() {
                    drawn
                } else {
                    format!("{step}: {text}")
                };
                output::Line::plain(output::Level::Info, "backfill_ended", shown).emit();
            }
            _ => line.emit(),
        }
    }

    fn draw_backfill(&self, m: &MultiProgress, b: &mut Backfill, step: &str, p: &BackfillProgress) {
        let bar = b.bar.get_or_insert_with(|| {
            let bar = m.add(ProgressBar::new(p.rows_total.unwrap_or(0)));
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix}} [{{bar:{BAR_WIDTH}}}] {{pos}}/{{len}} rows\n  {{wide_msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(prefix(step));
            bar
        });
        if let Some(t) = p.rows_total {
            bar.set_length(t.max(p.rows_done));
        }
        bar.set_position(p.rows_done);
        bar.set_message(live_text(p));
    }
}

/// Standard error as indicatif's terminal, for `--progress always` when it is
/// not one: ANSI cursor moves, and the width of the terminal if there is one, else 80.
#[derive(Debug)]
struct Stderr;

impl Stderr {
    fn put(&self, s: &str) -> std::io::Result<()> {
        use std::io::Write;
        std::io::stderr().lock().write_all(s.as_bytes())
    }
}

impl indicatif::TermLike for Stderr {
    fn width(&self) -> u16 {
        term_width() as u16
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))
        } else {
            Ok(())
        }
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))
        } else {
            Ok(())
        }
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        use std::io::Write;
        std::io::stderr().flush()
    }
}

/// `name` cut to fit in front of a bar.
fn prefix(step: &str) -> String {
    if step.chars().count() <= PREFIX_WIDTH {
        step.to_string()
    } else {
        let cut: String = step.chars().take(PREFIX_WIDTH - 1).collect();
        format!("{cut}…")
    }
}

/// `=========>          `: a bar drawn once, for the scrollback.
fn static_bar(fraction: f64, width: usize) -> String {
    let full = ((fraction.clamp(0.0, 1.0)) * width as f64).floor() as usize;
    if full >= width {
        "=".repeat(width)
    } else {
        format!("{}>{}", "=".repeat(full), " ".repeat(width - full - 1))
    }
}

/// The terminal's width in columns (80 when it cannot be read).
fn term_width() -> usize {
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        80
    }
}

/// What a bar says while it runs: why it is held, or its rate, batch and ETA.
fn live_text(p: &BackfillProgress) -> String {
    if p.held {
        return format!("held: {}", p.throttled.as_deref().unwrap_or("throttled"));
    }
    let mut s = format!("{:.0} rows/s, batch {}", p.rows_per_sec, p.batch_size);
    if let Some(eta) = p.eta {
        s.push_str(&format!(", ETA {}", human(eta)));
    }
    if p.workers > 1 {
        s.push_str(&format!(", {} workers", p.workers));
    }
    if let Some(why) = &p.throttled {
        s.push_str(&format!(", throttled: {why}"));
    }
    s
}

/// `1000/~200000 rows, 47275 rows/s, batch 1500, ETA 4.2s` (or why it is held).
fn progress_line(p: &BackfillProgress) -> String {
    let total = p.rows_total.map(|t| format!("/~{t}")).unwrap_or_default();
    format!("{}{total} rows, {}", p.rows_done, live_text(p))
}

/// The line a backfill leaves when it ends.
fn closing_text(p: &BackfillProgress, end: StepEnd, took: Duration, rows_before: u64) -> String {
    let at = match p.rows_total {
        Some(t) if t > 0 => format!(
            "{}/{t} ({} %)",
            p.rows_done,
            (p.rows_done.saturating_mul(100) / t).min(100)
        ),
        _ => format!("{} rows", p.rows_done),
    };
    let this_run = p.rows_done.saturating_sub(rows_before);
    let rate = if took.as_secs_f64() > 0.0 {
        this_run as f64 / took.as_secs_f64()
    } else {
        0.0
    };
    match end {
        StepEnd::Done if rows_before > 0 => format!(
            "done: {} rows ({this_run} in this run, in {}, {rate:.0} rows/s)",
            p.rows_done,
            human(took)
        ),
        StepEnd::Done => format!(
            "done: {} rows in {}, {rate:.0} rows/s",
            p.rows_done,
            human(took)
        ),
        StepEnd::Interrupted => format!("interrupted at {at}"),
        StepEnd::Failed | StepEnd::Waiting => format!("stopped at {at} by the error below"),
    }
}

impl Reporter for Terminal {
    fn message(&self, text: &str) {
        Line::info("message", text).emit();
    }

    fn step_started(&self, s: &StepStart<'_>) {
        STEPS_STARTED.fetch_add(1, Ordering::SeqCst);
        output::set_plan(s.plan);
        output::set_step(Some(s.step));
        self.state().current = Some((s.step.to_string(), Instant::now(), s.rows_done));
        Line::info("step_started", s.text)
            .plan(s.plan)
            .step(s.step)
            .emit();
    }

    fn step_ended(&self, step: &str, end: StepEnd) {
        self.close_backfill(step, end);
        if output::is_json() {
            Line::info("step_ended", format!("{step}: {end:?}").to_lowercase())
                .step(step)
                .field("end", format!("{end:?}").to_lowercase())
                .emit();
        }
        output::set_step(None);
    }

    fn lock_wait(&self, step: &str, relation: &str, attempt: u32, max: u32, blocker: Option<&str>) {
        let on = if relation.is_empty() {
            String::new()
        } else {
            format!(" on {relation}")
        };
        let text = format!(
            "waiting for its lock{on} (attempt {attempt}/{max}), blocked by {}",
            blocker.unwrap_or("another session")
        );
        let mut st = self.state();
        match &self.bars {
            Some(m) => {
                let sp = st.spinners.entry(step.to_string()).or_insert_with(|| {
                    let sp = m.add(ProgressBar::new_spinner());
                    sp.set_style(
                        ProgressStyle::with_template("{spinner} {prefix}: {wide_msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    sp.set_prefix(prefix(step));
                    sp.enable_steady_tick(Duration::from_millis(120));
                    sp
                });
                sp.set_message(text);
            }
            None => {
                if st.lock_lines.insert((step.to_string(), attempt)) {
                    drop(st);
                    Line::info("lock_wait", format!("{step}: {text}"))
                        .step(step)
                        .field("relation", relation)
                        .field("attempt", attempt)
                        .field("attempts", max)
                        .field("blocker", blocker)
                        .emit();
                }
            }
        }
    }

    fn lock_done(&self, step: &str) {
        if let Some(sp) = self.state().spinners.remove(step) {
            sp.finish_and_clear();
        }
    }

    fn backfill(&self, step: &str, p: &BackfillProgress) {
        let mut st = self.state();
        let rows_before = match &st.current {
            Some((s, _, before)) if s == step => *before,
            _ => 0,
        };
        let started = match &st.current {
            Some((s, t, _)) if s == step => *t,
            _ => Instant::now(),
        };
        let b = st
            .backfills
            .entry(step.to_string())
            .or_insert_with(|| Backfill {
                bar: None,
                last: p.clone(),
                started,
                // A pass that started afresh (after a failed verify) counts from zero.
                rows_before: rows_before.min(p.rows_done),
                last_line: None,
                reason: None,
            });
        b.last = p.clone();
        if let Some(m) = &self.bars {
            self.draw_backfill(m, b, step, p);
            return;
        }
        let reason_changed = b.reason != p.throttled;
        let due = b.last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) || reason_changed;
        if !due {
            return;
        }
        b.last_line = Some(Instant::now());
        b.reason = p.throttled.clone();
        drop(st);
        Line::info("backfill_progress", format!("{step}: {}", progress_line(p)))
            .step(step)
            .field("rows_done", p.rows_done)
            .field("rows_total", p.rows_total)
            .field("rows_per_sec", p.rows_per_sec.round())
            .field("batch_size", p.batch_size)
            .field("workers", p.workers)
            .field("eta_secs", p.eta.map(|d| d.as_secs()))
            .field("held", p.held)
            .field("throttled", &p.throttled)
            .emit();
    }

    fn backfill_done(&self, step: &str) {
        // An interrupted backfill freezes at once; any other end waits for the
        // runner's verdict (the range may be done but not yet verified).
        if self.interrupted.load(Ordering::SeqCst) {
            self.close_backfill(step, StepEnd::Interrupted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: Option<u64>) -> BackfillProgress {
        BackfillProgress {
            worker: 0,
            workers: 1,
            rows_done: done,
            rows_total: total,
            rows_per_sec: 100.0,
            batch_size: 1000,
            throttled: None,
            held: false,
            eta: None,
        }
    }

    #[test]
    fn an_interrupted_bar_says_where_it_stopped() {
        let p = progress(690_000, Some(1_000_000));
        let t = closing_text(&p, StepEnd::Interrupted, Duration::from_secs(5), 0);
        assert_eq!(t, "interrupted at 690000/1000000 (69 %)");
    }

    #[test]
    fn a_finished_bar_gives_rows_time_and_rate() {
        let p = progress(1_000_000, Some(990_000));
        let t = closing_text(&p, StepEnd::Done, Duration::from_secs(252), 0);
        assert_eq!(t, "done: 1000000 rows in 4m12s, 3968 rows/s");
        let t = closing_text(&p, StepEnd::Done, Duration::from_secs(100), 600_000);
        assert_eq!(
            t,
            "done: 1000000 rows (400000 in this run, in 1m40s, 4000 rows/s)"
        );
    }

    #[test]
    fn a_held_bar_gives_the_reason_not_a_rate() {
        let mut p = progress(10, Some(100));
        p.throttled = Some("paused by operator".into());
        p.held = true;
        assert_eq!(live_text(&p), "held: paused by operator");
    }

    #[test]
    fn static_bars_keep_their_width() {
        assert_eq!(static_bar(0.0, 5), ">    ");
        assert_eq!(static_bar(0.69, 10), "======>   ");
        assert_eq!(static_bar(1.0, 5), "=====");
    }
}
