//! Human durations (`"250ms"`, `"30s"`, `"1m"`, `"1h"`, `"7d"`) as used in topology files.

use std::time::Duration;

/// Parses `<integer><unit>` with unit one of `ms`, `s`, `m`, `h`, `d`.
///
/// Whole units only: window arithmetic is done in integer milliseconds, so a fraction
/// like `1.5h` is refused rather than rounded.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("expected a duration like \"30s\" or \"1h\", got \"{text}\" (no unit)")
    })?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "expected a duration like \"30s\" or \"1h\", got \"{text}\""
        ));
    }
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("duration \"{text}\" is out of range"))?;
    if unit.starts_with('.') {
        return Err(format!(
            "\"{text}\": whole units only; use a smaller unit (e.g. \"90m\" for 1.5h)"
        ));
    }
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(format!(
                "unknown duration unit \"{other}\" in \"{text}\" (expected ms, s, m, h or d)"
            ))
        }
    };
    // Windows and lateness are i64 milliseconds in event-time arithmetic; a century
    // bounds them far from overflow.
    const MAX_MS: u64 = 36_500 * 86_400_000;
    value
        .checked_mul(unit_ms)
        .filter(|ms| *ms <= MAX_MS)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration \"{text}\" is out of range (at most 36500d)"))
}

/// Parses a byte size such as `1048576`, `512KiB`, `1MiB` or `2MB`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("expected a size like \"1MiB\", got \"{text}\""))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit \"{other}\" in \"{text}\"")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size \"{text}\" is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
    }

    #[test]
    fn refuses_fractions_and_unknown_units() {
        assert!(parse_duration("1.5h")
            .unwrap_err()
            .contains("whole units only"));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w")
            .unwrap_err()
            .contains("unknown duration unit"));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("36501d")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("1TB").is_err());
    }
}
