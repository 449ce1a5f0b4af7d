//! Byte sizes written as Kubernetes quantities (`512Mi`, `1G`, `1048576`), so that a
//! Topic's `retention.maxBytes` reads like a pod's memory limit.

/// The schema pattern: an integer with an optional binary (`Ki`..`Ei`) or decimal
/// (`k`..`E`) suffix.
pub const PATTERN: &str = r"^[0-9]+(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// Why a quantity did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid byte quantity {input:?}: {reason} (expected e.g. 512Mi, 10Gi, 1000000)")]
pub struct QuantityError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses a quantity into bytes.
pub fn parse_bytes(input: &str) -> Result<u64, QuantityError> {
    let err = |reason| QuantityError {
        input: input.to_owned(),
        reason,
    };
    let split = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    let (num, suffix) = input.split_at(split);
    if num.is_empty() {
        return Err(err("missing number"));
    }
    let multiplier: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        _ => return Err(err("unknown suffix")),
    };
    let value: u64 = num.parse().map_err(|_| err("number too large"))?;
    value
        .checked_mul(multiplier)
        .ok_or_else(|| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("42"), Ok(42));
        assert!(parse_bytes("1.5Gi").is_err());
        assert!(parse_bytes("Gi").is_err());
        assert!(parse_bytes("99999999999999999999").is_err());
        assert!(parse_bytes("20Ei").is_err());
    }
}
