//! Every line pgshift writes to stderr goes through here, in one of two forms:
//!
//! - text, for a person: the line as it is, with an RFC 3339 timestamp in front
//!   at `-v` and above, and never an escape code (the progress bars, drawn by
//!   indicatif only on a terminal, are the one exception);
//! - JSON (`--log-format json`), for a log pipeline: each line one object with
//!   `timestamp` (RFC 3339, UTC), `level`, `event`, `plan`, `step`, `target`
//!   (the database, password redacted), `message` and `fields`.
//!
//! `tracing` events of the library come here too (see [`Forward`]), so that a
//! log line never tears a progress bar and JSON mode has no other kind of line.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use indicatif::MultiProgress;
use serde_json::{Map, Value as Json};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context as LayerContext;
use tracing_subscriber::registry::LookupSpan;

use super::{Global, LogFormat};

/// How bad or how chatty a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

/// How lines are written, fixed once at start-up.
#[derive(Debug, Clone, Copy)]
struct Settings {
    json: bool,
    timestamps: bool,
    quiet: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// What every line is about, as far as it is known: the database, the plan, the step.
#[derive(Debug, Default)]
struct Scope {
    target: Option<String>,
    plan: Option<String>,
    step: Option<String>,
}

static SCOPE: Mutex<Scope> = Mutex::new(Scope {
    target: None,
    plan: None,
    step: None,
});

/// The progress bars being drawn, if any: text lines are printed above them.
static BARS: Mutex<Option<MultiProgress>> = Mutex::new(None);

fn settings() -> Settings {
    SETTINGS.get().copied().unwrap_or(Settings {
        json: false,
        timestamps: false,
        quiet: false,
    })
}

/// Fixes the format for the whole process (from the global options).
pub fn init(g: &Global) {
    let _ = SETTINGS.set(Settings {
        json: g.log_format == LogFormat::Json,
        timestamps: g.verbose > 0,
        quiet: g.quiet,
    });
}

/// True in `--log-format json`: no bars, no prompts, every line an object.
pub fn is_json() -> bool {
    settings().json
}

/// The database every following line is about (redacted URL).
pub fn set_target(target: &str) {
    lock_scope().target = Some(target.to_string());
}

/// The plan every following line is about.
pub fn set_plan(plan: &str) {
    lock_scope().plan = Some(plan.to_string());
}

/// The step every following line is about (`None` between steps).
pub fn set_step(step: Option<&str>) {
    lock_scope().step = step.map(str::to_string);
}

fn lock_scope() -> std::sync::MutexGuard<'static, Scope> {
    SCOPE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers the bars being drawn (or none), so that lines go above them.
pub fn set_bars(bars: Option<MultiProgress>) {
    *BARS.lock().unwrap_or_else(|e| e.into_inner()) = bars;
}

/// One line for stderr: what happened (`event`), in words (`text`), with details.
#[derive(Debug, Clone)]
pub struct Line {
    level: Level,
    event: &'static str,
    text: String,
    plan: Option<String>,
    step: Option<String>,
    fields: Map<String, Json>,
    prefix: &'static str,
}

impl Line {
    /// An informational line, printed as `pgshift: TEXT`.
    pub fn info(event: &'static str, text: impl Into<String>) -> Line {
        Line::new(Level::Info, event, text, "pgshift: ")
    }

    /// An error, printed as `error: TEXT`.
    pub fn error(event: &'static str, text: impl Into<String>) -> Line {
        Line::new(Level::Error, event, text, "error: ")
    }

    /// A warning, printed as `warning: TEXT`.
    pub fn warn(event: &'static str, text: impl Into<String>) -> Line {
        Line::new(Level::Warn, event, text, "warning: ")
    }

    /// A line printed as it is (a continuation, the next command, a diagnostic).
    pub fn plain(level: Level, event: &'static str, text: impl Into<String>) -> Line {
        Line::new(level, event, text, "")
    }

    fn new(
        level: Level,
        event: &'static str,
        text: impl Into<String>,
        prefix: &'static str,
    ) -> Line {
        Line {
            level,
            event,
            text: text.into(),
            plan: None,
            step: None,
            fields: Map::new(),
            prefix,
        }
    }

    /// The plan this line is about (else the current one).
    pub fn plan(mut self, plan: &str) -> Line {
        self.plan = Some(plan.to_string());
        self
    }

    /// The step this line is about (else the current one).
    pub fn step(mut self, step: &str) -> Line {
        self.step = Some(step.to_string());
        self
    }

    /// A detail for the JSON form.
    pub fn field(mut self, key: &str, value: impl serde::Serialize) -> Line {
        self.fields.insert(
            key.to_string(),
            serde_json::to_value(value).unwrap_or(Json::Null),
        );
        self
    }

    /// Writes the line (unless `-q` silences it: only errors pass `-q`).
    pub fn emit(self) {
        let s = settings();
        if s.quiet && self.level != Level::Error {
            return;
        }
        let now = SystemTime::now();
        let text = if s.json {
            self.to_json(now).to_string()
        } else if s.timestamps {
            format!("{} {}{}", rfc3339(now), self.prefix, self.text)
        } else {
            format!("{}{}", self.prefix, self.text)
        };
        write_line(&text);
    }

    fn to_json(&self, now: SystemTime) -> Json {
        let scope = lock_scope();
        serde_json::json!({
            "timestamp": rfc3339(now),
            "level": self.level.as_str(),
            "event": self.event,
            "plan": self.plan.clone().or_else(|| scope.plan.clone()),
            "step": self.step.clone().or_else(|| scope.step.clone()),
            "target": scope.target,
            "message": self.text,
            "fields": self.fields,
        })
    }
}

fn write_line(text: &str) {
    let bars = BARS.lock().unwrap_or_else(|e| e.into_inner());
    match bars.as_ref() {
        Some(m) => {
            let _ = m.println(text);
        }
        None => {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{text}");
        }
    }
}

/// `2025-03-01T04:05:06.789Z`: RFC 3339 in UTC, to the millisecond.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01: the year is
/// counted from March, so that the leap day falls at its end (eras of 400 years
/// repeat exactly: 146,097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Forwards the library's `tracing` events to [`Line`]s: `plan` and `step`
/// come from the event or its spans, the other fields go to `fields`.
pub struct Forward;

/// The fields of a span or an event, as JSON values.
#[derive(Default)]
struct Fields(BTreeMap<String, Json>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), Json::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Json::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_string(), value.into());
    }
}

impl<S> Layer<S> for Forward
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: LayerContext<'_, S>,
    ) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: LayerContext<'_, S>) {
        let mut own = Fields::default();
        event.record(&mut own);
        let message = match own.0.remove("message") {
            Some(Json::String(s)) => s,
            _ => String::new(),
        };
        let mut f = Fields::default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(sf) = span.extensions().get::<Fields>() {
                    f.0.extend(sf.0.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        f.0.extend(own.0);
        let (level, prefix) = match *event.metadata().level() {
            tracing::Level::ERROR => (Level::Error, "error: "),
            tracing::Level::WARN => (Level::Warn, "warning: "),
            tracing::Level::INFO => (Level::Info, "info: "),
            _ => (Level::Debug, "debug: "),
        };
        let mut line = Line::new(level, "log", message, prefix);
        if let Some(Json::String(p)) = f.0.remove("plan") {
            line = line.plan(&p);
        }
        if let Some(Json::String(s)) = f.0.remove("step") {
            line = line.step(&s);
        }
        if settings().json {
            line.fields = f.0.into_iter().collect();
        } else {
            // In text the step leads and the details follow as `key=value`.
            if let Some(s) = &line.step {
                line.text = format!("{s}: {}", line.text);
            }
            for (k, v) in &f.0 {
                match v {
                    Json::String(s) => line.text.push_str(&format!(" {k}={s}")),
                    other => line.text.push_str(&format!(" {k}={other}")),
                }
            }
        }
        line.emit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // leap day 2000
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.123Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // last second of 2025
        assert_eq!(rfc3339(t), "2025-12-31T23:59:59.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_400); // 2100 is no leap year
        assert_eq!(rfc3339(t), "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn a_json_line_carries_event_scope_and_fields() {
        let line = Line::info("backfill_progress", "1000/~5000 rows")
            .plan("p")
            .step("fill")
            .field("rows_done", 1000u64);
        let v = line.to_json(UNIX_EPOCH);
        assert_eq!(v["event"], "backfill_progress");
        assert_eq!(v["plan"], "p");
        assert_eq!(v["step"], "fill");
        assert_eq!(v["level"], "info");
        assert_eq!(v["fields"]["rows_done"], 1000);
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        assert!(v.get("target").is_some());
    }
}
