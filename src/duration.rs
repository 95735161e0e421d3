//! Human durations in config: `250ms`, `30s`, `5m`, `1h30m`.

use std::time::Duration;

/// The longest duration config accepts: a year with a leap day. Longer ones are typos, and
/// anything added to a clock (`Instant + timeout`, a jittered fire time) stays far from overflow.
pub const MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Why a duration in config is refused; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("{0:?} is not a duration like 30s, 5m or 1h30m")]
    NotADuration(String),
    #[error("{0:?} needs a unit: ms, s, m or h")]
    NoUnit(String),
    #[error("{0:?} is longer than the maximum of 366 days (8784h)")]
    TooLong(String),
}

/// Config collects every field's problem as text, reported together.
impl From<DurationError> for String {
    fn from(error: DurationError) -> String {
        error.to_string()
    }
}

/// Parses a duration made of `<number><unit>` parts, units `ms`, `s`, `m`, `h`, up to [`MAX`].
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(DurationError::NotADuration(text.to_string()));
        }
        let too_long = || DurationError::TooLong(text.to_string());
        let number: u64 = rest[..digits].parse().map_err(|_| too_long())?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let part = match &rest[..unit_len] {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            _ => return Err(DurationError::NoUnit(text.to_string())),
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .filter(|total| *total <= MAX)
            .ok_or_else(too_long)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums_parts() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(parse("30").is_err());
        assert!(parse("3d").is_err());
        assert!(parse("m").is_err());
        assert!(parse("").is_err());
        assert!(parse("-5s").is_err());
    }

    #[test]
    fn rejects_durations_beyond_the_maximum_without_overflowing() {
        assert_eq!(parse("8784h"), Ok(MAX));
        assert_eq!(parse("8783h60m"), Ok(MAX));
        for text in [
            "8784h1ms",
            "18446744073709551615h",
            "5124095576030431h",
            "99999999999999999999s",
            "8784h8784h",
        ] {
            let err = parse(text).unwrap_err();
            assert!(matches!(err, DurationError::TooLong(_)), "{text}: {err}");
            assert!(
                err.to_string().contains("maximum of 366 days"),
                "{text}: {err}"
            );
        }
    }
}
