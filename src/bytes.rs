//! Sizes as people write them in a plan and on the command line: `512MB`,
//! `64kB`, `2GB`, or a plain number of bytes. Units are powers of 1024, as in
//! `postgresql.conf` (`1MB` is 1024 kB), so a limit reads the way the server's
//! own settings and `pg_size_pretty` do.

/// Parses `512MB`, `1.5GB`, `64kB`, `100B` or `4096` (bytes).
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let help = "write a number of bytes or a size: `64kB`, `512MB`, `2GB`";
    let num_len = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    if num_len == 0 {
        return Err(format!("`{t}` is not a size; {help}"));
    }
    let number: f64 = t[..num_len]
        .parse()
        .map_err(|_| format!("`{t}` is not a size; {help}"))?;
    let unit = t[num_len..].trim();
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return Err(format!("`{unit}` is not a unit of size in `{t}`; {help}")),
    };
    let bytes = number * factor as f64;
    if !bytes.is_finite() || bytes >= (1u64 << 60) as f64 {
        return Err(format!("`{t}` is larger than any database"));
    }
    Ok(bytes.round() as u64)
}

/// Formats bytes the way `pg_size_pretty` does, to one decimal: `512MB`, `1.5GB`, `300B`.
pub fn format(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || (value - value.round()).abs() < 0.05 {
        format!("{}{}", value.round() as u64, UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_as_postgresql_writes_them() {
        assert_eq!(parse("512MB").unwrap(), 512 << 20);
        assert_eq!(parse("64kB").unwrap(), 64 << 10);
        assert_eq!(parse("1.5GB").unwrap(), 3 << 29);
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("100 B").unwrap(), 100);
        for bad in ["", "MB", "5 parsecs", "-1MB", "1e30TB"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_like_pg_size_pretty() {
        assert_eq!(format(512 << 20), "512MB");
        assert_eq!(format(3 << 29), "1.5GB");
        assert_eq!(format(300), "300B");
        assert_eq!(format(0), "0B");
        for t in ["512MB", "64kB", "2GB", "1.5GB"] {
            assert_eq!(format(parse(t).unwrap()), t);
        }
    }
}
