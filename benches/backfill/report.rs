//! The benchmark's tables (markdown, pasted into the README as they are) and the
//! issue's targets, measured.

use super::{Job, Row};

pub fn print_table(rows: &[Row]) {
    let find = |j: Job| rows.iter().find(|r| r.job == j && r.app.is_none());
    let base_loop = find(Job::Loop { trigger: true }).map(Row::rate);
    let base_update = find(Job::Update).map(Row::rate);
    println!(
        "| job | app | secs | rows/s | spread of rows/s | vs loop+trigger | vs UPDATE | app ops/s | app p99 | app max | app ops > 100 ms | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        // Each workload row is compared with the same job's baseline under the workload.
        let base = |j: Job| {
            rows.iter()
                .find(|x| x.job == j && x.app.is_some() == r.app.is_some())
                .map(Row::rate)
                .or(if j == Job::Update {
                    base_update
                } else {
                    base_loop
                })
        };
        let ratio = |b: Option<f64>| {
            b.map(|b| format!("{:.2}", r.rate() / b))
                .unwrap_or_default()
        };
        let (ops, p99, max, over) = match &r.app {
            Some(s) => (
                format!("{:.0}", s.ops_per_sec),
                ms(s.p99),
                ms(s.max),
                s.over_100ms.to_string(),
            ),
            None => Default::default(),
        };
        // The application alone did no rows: no rate, no ratios.
        let (rate, vs_loop, vs_update) = if r.job == Job::Alone {
            Default::default()
        } else {
            (
                thousands(r.rate() as i64),
                ratio(base(Job::Loop { trigger: true })),
                ratio(base(Job::Update)),
            )
        };
        let verify = r
            .verify_ms
            .map(|v| format!(" (verify {v} ms)"))
            .unwrap_or_default();
        let spread = r
            .spread
            .map(|(lo, hi)| format!("{}–{}", thousands(lo as i64), thousands(hi as i64)))
            .unwrap_or_default();
        println!(
            "| {}{verify} | {} | {:.2} | {rate} | {spread} | {vs_loop} | {vs_update} | {ops} | {p99} | {max} | {over} | {} |",
            r.job.name(),
            if r.app.is_some() { "workload" } else { "idle" },
            r.secs,
            r.rss_kib
                .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_default()
        );
    }
}

/// The targets, measured.
pub fn targets(rows: &[Row], n: i64) {
    let rate = |j: Job, app: bool| {
        rows.iter()
            .find(|r| r.job == j && r.app.is_some() == app)
            .map(Row::rate)
            .unwrap_or(f64::NAN)
    };
    println!("\ntargets at {} rows (those whose jobs ran):", thousands(n));
    let fixed = rate(Job::Fixed, false) / rate(Job::Loop { trigger: true }, false);
    let need = if n >= 10_000_000 { 0.98 } else { 0.95 };
    if fixed.is_finite() {
        println!(
            "- pgshift fixed ≥ {need}× the plain loop with the trigger (idle): {fixed:.2}× ({})",
            met(fixed >= need)
        );
    }
    let adaptive = rate(Job::Adaptive, false) / rate(Job::Update, false);
    if adaptive.is_finite() {
        println!(
            "- pgshift adaptive 50ms ≥ 0.9× the single UPDATE (idle): {adaptive:.2}× ({})",
            met(adaptive >= 0.9)
        );
    }
    let app = |j: Job| {
        rows.iter()
            .find(|r| r.job == j && r.app.is_some())
            .and_then(|r| r.app.as_ref())
    };
    if let Some(s) = app(Job::Adaptive) {
        // The same bound, read against what the application saw with no job at all.
        let floor = app(Job::Alone)
            .map(|a| {
                format!(
                    "; the application alone, as long: {}, {} over 100 ms",
                    ms(a.max),
                    a.over_100ms
                )
            })
            .unwrap_or_default();
        println!(
            "- pgshift adaptive 50ms: the application's worst latency ≤ 100 ms: {}, {} over 100 ms ({}){floor}",
            ms(s.max),
            s.over_100ms,
            met(s.max <= 100_000)
        );
    }
}

pub fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

pub fn ms(us: u32) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

pub fn thousands(n: i64) -> String {
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}
