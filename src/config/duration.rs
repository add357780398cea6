//! Durations as written in flags and files: `250ms`, `2s`, `5m`, `1h`, `1.5s`.
//!
//! This is the one parser for every duration legate reads (the TOML file and
//! flags such as `legate wait --timeout`), so they all accept the same forms and
//! fail with the same messages. It hands back a `std::time::Duration`; whether
//! zero is allowed is the caller's business, because it depends on the setting
//! (`shutdown_delay = "0s"` is fine, `connect_timeout = "0s"` is not).

use std::time::Duration;

/// The accepted units, longest first so `ms` is not read as `m` followed by junk.
const UNITS: [(&str, u128); 4] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
];

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parse one number followed by one unit (`ms`, `s`, `m` or `h`), like `250ms` or `1.5s`.
///
/// The error is a complete sentence that names the text and says what to write instead.
/// Fractions finer than a nanosecond are truncated.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let fail = |why: &str| Err(format!("invalid duration {text:?}: {why}"));

    if text.is_empty() {
        return fail("expected a number and a unit, like 250ms, 2s, 5m or 1h");
    }
    if text.chars().any(char::is_whitespace) {
        return fail("remove the spaces; write it like 250ms, 2s, 5m or 1h");
    }
    if text.starts_with('-') {
        return fail("a duration cannot be negative");
    }

    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_end);

    if number.is_empty() {
        return fail("expected a number first, like 250ms, 2s, 5m or 1h");
    }
    if unit.is_empty() {
        return fail("add a unit: ms, s, m or h");
    }
    let Some(&(_, unit_nanos)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        if unit.chars().any(|c| c.is_ascii_digit()) {
            return fail("write one number and one unit, like 90m rather than 1h30m");
        }
        return fail(&format!("unknown unit {unit:?}: use ms, s, m or h"));
    };

    let (whole, fraction) = match number.split_once('.') {
        None => (number, ""),
        Some((whole, fraction)) => {
            if whole.is_empty() || fraction.is_empty() || fraction.contains('.') {
                return fail("expected a number like 2 or 1.5 before the unit");
            }
            (whole, fraction)
        }
    };

    let too_large = || format!("invalid duration {text:?}: it is too large");
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_large)?;

    // Beyond 15 digits even an hour's fraction is below a nanosecond, and
    // stopping there keeps 10^digits inside u128.
    let fraction = &fraction[..fraction.len().min(15)];
    if !fraction.is_empty() {
        let digits: u128 = fraction.parse().map_err(|_| too_large())?;
        let scale = 10u128.pow(fraction.len() as u32);
        nanos = nanos
            .checked_add(digits * unit_nanos / scale)
            .ok_or_else(too_large)?;
    }

    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| too_large())?;
    // The remainder of a division by 10^9 always fits in u32.
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, subsec))
}

/// A duration the way the user wrote it, for messages and logs (`0s`, `500ms`, `90s`,
/// `5m`, `2h`): the largest unit that shows it exactly, so what `parse_duration` read
/// prints back the same. Sub-millisecond parts are dropped, and a duration under 1ms
/// (never configured, but computed ones exist) is shown in `ns`.
pub(crate) fn show(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 && !duration.is_zero() {
        format!("{}ns", duration.as_nanos())
    } else if !millis.is_multiple_of(1000) {
        format!("{millis}ms")
    } else if millis.is_multiple_of(3_600_000) && millis > 0 {
        format!("{}h", millis / 3_600_000)
    } else if millis.is_multiple_of(60_000) && millis > 0 {
        format!("{}m", millis / 60_000)
    } else {
        format!("{}s", millis / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Duration {
        match parse_duration(text) {
            Ok(duration) => duration,
            Err(err) => panic!("{text:?} should parse, got {err}"),
        }
    }

    fn err(text: &str) -> String {
        match parse_duration(text) {
            Ok(duration) => panic!("{text:?} should fail, got {duration:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn accepts_milliseconds() {
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("0ms"), Duration::ZERO);
    }

    #[test]
    fn accepts_seconds() {
        assert_eq!(ok("2s"), Duration::from_secs(2));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("30s"), Duration::from_secs(30));
    }

    #[test]
    fn accepts_minutes() {
        assert_eq!(ok("5m"), Duration::from_secs(300));
    }

    #[test]
    fn accepts_hours() {
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("24h"), Duration::from_secs(86_400));
    }

    #[test]
    fn accepts_fractions() {
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("0.25s"), Duration::from_millis(250));
        assert_eq!(ok("1.5m"), Duration::from_secs(90));
        assert_eq!(ok("0.5h"), Duration::from_secs(1800));
        assert_eq!(ok("1.5ms"), Duration::from_micros(1500));
        assert_eq!(ok("0.000000001s"), Duration::from_nanos(1));
    }

    #[test]
    fn truncates_below_a_nanosecond() {
        assert_eq!(ok("0.0000000019s"), Duration::from_nanos(1));
        assert_eq!(
            ok("1.00000000000000000000000000001s"),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn accepts_leading_zeros() {
        assert_eq!(ok("007s"), Duration::from_secs(7));
    }

    #[test]
    fn accepts_the_largest_representable() {
        assert_eq!(ok(&format!("{}s", u64::MAX)), Duration::from_secs(u64::MAX));
    }

    #[test]
    fn rejects_empty() {
        assert!(err("").contains("expected a number and a unit"));
    }

    #[test]
    fn rejects_negative() {
        assert!(err("-1s").contains("cannot be negative"));
        assert!(err("-0s").contains("cannot be negative"));
    }

    #[test]
    fn rejects_missing_unit() {
        assert_eq!(
            err("5"),
            "invalid duration \"5\": add a unit: ms, s, m or h"
        );
        assert!(err("1.5").contains("add a unit"));
    }

    #[test]
    fn rejects_unknown_unit() {
        let message = err("5y");
        assert!(message.contains("unknown unit \"y\""), "{message}");
        assert!(message.contains("ms, s, m or h"), "{message}");
        assert!(err("5sec").contains("unknown unit \"sec\""));
        assert!(err("5S").contains("unknown unit \"S\""));
        assert!(err("5us").contains("unknown unit \"us\""));
        assert!(err("5d").contains("unknown unit \"d\""));
    }

    #[test]
    fn rejects_missing_number() {
        assert!(err("s").contains("expected a number first"));
        assert!(err("ms").contains("expected a number first"));
        assert!(err("+5s").contains("expected a number first"));
    }

    #[test]
    fn rejects_compound_durations() {
        assert!(err("1h30m").contains("one number and one unit"));
        assert!(err("5s5").contains("one number and one unit"));
    }

    #[test]
    fn rejects_malformed_fractions() {
        for text in [".5s", "5.s", "1.2.3s", "."] {
            let message = err(text);
            assert!(
                message.contains("expected a number") || message.contains("add a unit"),
                "{text:?}: {message}"
            );
        }
    }

    #[test]
    fn rejects_overflow() {
        assert!(err("99999999999999999999h").contains("too large"));
        assert!(err(&format!("{}h", u64::MAX)).contains("too large"));
        assert!(err("999999999999999999999999999999999999999999s").contains("too large"));
    }

    #[test]
    fn rejects_whitespace() {
        for text in [" 5s", "5s ", "5 s", "\t5s", "5s\n"] {
            assert!(err(text).contains("remove the spaces"), "{text:?}");
        }
    }

    #[test]
    fn rejects_junk() {
        assert!(err("5s!").contains("unknown unit"));
        assert!(err("5µs").contains("unknown unit"));
        assert!(err("five seconds").contains("remove the spaces"));
        assert!(err("abc").contains("expected a number first"));
    }

    #[test]
    fn quotes_the_text_in_every_error() {
        assert!(err("5y").starts_with("invalid duration \"5y\": "));
        assert!(err("a\"b").starts_with("invalid duration \"a\\\"b\": "));
    }

    #[test]
    fn show_uses_the_largest_exact_unit() {
        assert_eq!(show(Duration::ZERO), "0s");
        assert_eq!(show(Duration::from_millis(500)), "500ms");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::from_secs(300)), "5m");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
        assert_eq!(show(Duration::from_nanos(5)), "5ns");
        for text in ["0s", "250ms", "2s", "90s", "5m", "2h"] {
            assert_eq!(show(ok(text)), text);
        }
    }
}
