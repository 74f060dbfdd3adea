//! Calendar days in UTC, as whole days since 1970-01-01.
//!
//! The program's allowance resets at 00:00 UTC and its start and end are
//! dates, so a day number is all the meter needs; no time-zone library.

use std::fmt;

/// A UTC calendar day: days since 1970-01-01 (negative before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Day(pub i64);

impl Day {
    /// Parse `YYYY-MM-DD`, rejecting impossible dates such as 2025-02-30.
    pub fn parse(text: &str) -> Option<Day> {
        let bytes = text.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return None;
        }
        let number = |range: std::ops::Range<usize>| -> Option<i64> {
            let part = text.get(range)?;
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part.parse().ok()
        };
        let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
        if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
            return None;
        }
        Some(Day(days_from_civil(year, month, day)))
    }

    /// The day that contains `unix_seconds`.
    pub fn from_unix(unix_seconds: i64) -> Day {
        Day(unix_seconds.div_euclid(86_400))
    }

    /// Seconds since the epoch at 00:00 UTC of this day.
    pub fn start_unix(self) -> i64 {
        self.0 * 86_400
    }

    /// (year, month, day).
    pub fn civil(self) -> (i64, i64, i64) {
        civil_from_days(self.0)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// As `YYYY-MM-DD`.
impl serde::Serialize for Day {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's algorithms (chrono-compatible dates without a dependency).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_impossible_dates() {
        assert_eq!(Day::parse("1970-01-01"), Some(Day(0)));
        assert_eq!(
            Day::parse("2024-12-01").map(|d| d.to_string()).as_deref(),
            Some("2024-12-01")
        );
        assert_eq!(Day::parse("2024-02-29").map(|d| d.0), Some(19_782));
        assert_eq!(Day::parse("2025-02-29"), None);
        assert_eq!(Day::parse("2025-13-01"), None);
        assert_eq!(Day::parse("2025-1-01"), None);
        assert_eq!(Day::parse("+025-01-01"), None);
        assert_eq!(Day::from_unix(-1), Day(-1));
        assert_eq!(Day::from_unix(1_735_689_600).to_string(), "2025-01-01");
        for n in [-1, 0, 59, 60, 19_782, 2_000_000] {
            let day = Day(n);
            assert_eq!(Day::parse(&day.to_string()), Some(day), "{n}");
        }
    }
}
