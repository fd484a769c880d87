//! Durations as people write them in a plan: `500ms`, `2s`, `10m`, `1h30m`.

use std::time::Duration;

/// Parses `500ms`, `2s`, `1.5s`, `10m`, `1h`, `1h30m`, or `0`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let help = "write a number followed by a unit: `500ms`, `2s`, `10m`, `1h` (or `0` for none)";
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(format!("empty duration; {help}"));
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(format!("`{t}` is not a duration; {help}"));
        }
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("`{t}` is not a duration; {help}"))?;
        // `5 s` and `1h 30m` read naturally; spaces around a unit are allowed.
        rest = rest[num_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let secs = match unit {
            "ms" => number / 1000.0,
            "s" => number,
            "m" | "min" => number * 60.0,
            "h" => number * 3600.0,
            "" => return Err(format!("`{t}` has no unit; {help}")),
            "d" | "day" | "days" => {
                return Err(format!(
                    "`{t}`: days are not a unit here; write hours instead (`24h`)"
                ));
            }
            other => return Err(format!("`{other}` is not a unit of time in `{t}`; {help}")),
        };
        // Checked: `from_secs_f64` panics on overflow or NaN, and a plan is untrusted input.
        let part = Duration::try_from_secs_f64(secs).map_err(|_| too_long(t))?;
        total = total.checked_add(part).ok_or_else(|| too_long(t))?;
    }
    if total > Duration::from_secs(7 * 24 * 3600) {
        return Err(too_long(t));
    }
    Ok(total)
}

fn too_long(t: &str) -> String {
    format!("`{t}` is longer than a week, which is surely a mistake; durations go up to `168h`")
}

/// Formats a duration the way a plan writes it (`500ms`, `2s`, `10m`, `1m30s`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0".into();
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s > 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A duration for people reading a progress line or an ETA: `0.4s`, `45s`,
/// `12m05s`, `2h23m`, `3d04h`; tenths only under ten seconds, seconds are
/// dropped past an hour, minutes past a day.
pub fn human(d: Duration) -> String {
    if d < Duration::from_millis(9_950) {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let s = d.as_secs_f64().round() as u64;
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{mins:02}m")
    } else if mins > 0 {
        format!("{mins}m{secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// The value PostgreSQL's `lock_timeout`/`statement_timeout` settings take: milliseconds.
pub fn as_pg_setting(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_people_write() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("5 s").unwrap(), Duration::from_secs(5));
    }

    #[test]
    fn a_spaced_unknown_unit_is_named_as_the_unit() {
        let e = parse("5 parsecs").unwrap_err();
        assert!(e.starts_with("`parsecs` is not a unit of time"), "{e}");
    }

    #[test]
    fn rejects_the_rest() {
        for bad in [
            "",
            "5",
            "ms",
            "5 parsecs",
            "-1s",
            "1d",
            "1x",
            "9999h",
            // Regression: these panicked in `Duration::from_secs_f64` (found by the bad-plan corpus probes).
            "99999999999999999999h",
            "1e400s",
            "1.7976931348623157e308s",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn human_durations_read_at_a_glance() {
        assert_eq!(human(Duration::from_secs(45)), "45s");
        assert_eq!(human(Duration::from_secs(725)), "12m05s");
        assert_eq!(human(Duration::from_secs(2 * 3600 + 23 * 60 + 20)), "2h23m");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d04h");
        assert_eq!(human(Duration::from_millis(400)), "0.4s");
        assert_eq!(human(Duration::from_millis(6_640)), "6.6s");
    }

    #[test]
    fn formats_round_trip() {
        for t in ["500ms", "2s", "10m", "1h", "1m30s", "0"] {
            assert_eq!(format(parse(t).unwrap()), t);
        }
    }
}
