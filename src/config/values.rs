//! Single values as the files spell them: ports, durations ("15s", "1h30m"), sizes ("8MiB"),
//! log levels. Each error quotes the value and gives an example.

use std::time::Duration;

pub(super) fn parse_port(s: &str, at: &str, errors: &mut Vec<String>) -> u16 {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            errors.push(format!("{at}: \"{s}\" is not a port number (1 to 65535)"));
            0
        }
    }
}

pub(super) fn int_port(p: i64, at: &str, errors: &mut Vec<String>) -> u16 {
    match u16::try_from(p) {
        Ok(p) if p != 0 => p,
        _ => {
            errors.push(format!("{at}: {p} is not a port number (1 to 65535)"));
            0
        }
    }
}

pub(super) fn duration_setting(
    raw: &Option<String>,
    default: Duration,
    at: &str,
    errors: &mut Vec<String>,
) -> Duration {
    match raw {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                errors.push(format!("{at}: must be longer than zero"));
                default
            }
            Err(e) => {
                errors.push(format!("{at}: {e}"));
                default
            }
        },
    }
}

/// `"15s"`, `"2m"`, `"500ms"`, `"1h30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("\"{s}\" is not a duration (examples: \"500ms\", \"15s\", \"2m\", \"1h\")");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(d);
    }
    if total > Duration::from_secs(7 * 24 * 3600) {
        return Err(format!("\"{s}\" is longer than a week"));
    }
    Ok(total)
}

/// `"8MiB"`, `"512KiB"`, `"1GiB"`, `"65536"` (bytes); KB/MB/GB are taken as their binary cousins.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let bad = || format!("\"{s}\" is not a size (examples: \"512KiB\", \"8MiB\", \"1GiB\")");
    if digits == 0 {
        return Err(bad());
    }
    let n: u64 = t[..digits].parse().map_err(|_| bad())?;
    let mult: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

pub fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("\"{s}\" is not a log level (error, warn, info, debug, trace)"))
}
