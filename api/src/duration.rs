//! Go-style durations (`500ms`, `30s`, `1h30m`), the format Kubernetes users know from
//! other resources and the one CEL's `duration()` parses, so that schema rules such as
//! `duration(self.max) >= duration(self.initial)` and this parser agree.

use std::time::Duration;

/// The schema pattern: one or more `<number><unit>` pairs, units `ns`, `us`, `ms`, `s`, `m`,
/// `h`.
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 30s, 1h30m)")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses a Go-style duration.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(err("empty"));
    }
    let mut total_nanos: u128 = 0;
    let mut rest = input;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit"))?;
        if num_len == 0 {
            return Err(err("missing number"));
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(err("unknown unit")),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        if int_part.is_empty()
            || frac_part.contains('.')
            || (num.contains('.') && frac_part.is_empty())
        {
            return Err(err("malformed number"));
        }
        let int: u128 = int_part.parse().map_err(|_| err("number too large"))?;
        let mut nanos = int.checked_mul(scale).ok_or_else(|| err("too large"))?;
        let mut frac_scale = scale;
        for digit in frac_part.bytes() {
            frac_scale /= 10;
            nanos += u128::from(digit - b'0') * frac_scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| err("too large"))?;
        rest = tail;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err("too large"))?;
    // The remainder is below 1e9 and fits in u32.
    let sub = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_malformed() {
        for bad in ["", "10", "s", "10x", "1..5s", "1.s", "-1s", "1 s"] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
