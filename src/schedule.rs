//! Five-field cron schedules (minute hour day-of-month month day-of-week, UTC), as crontab
//! and Kubernetes CronJobs write them; a sixth, leading seconds field is accepted too.

use std::cell::RefCell;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A parsed schedule; keeps the text it came from for reports.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expression: Arc<str>,
    cron: Arc<cron::Schedule>,
}

thread_local! {
    /// Schedules parsed on this thread, by expression. A fleet shares a handful of expressions,
    /// and a parsed one holds every allowed value of every field (about 2 KiB): 10,000 targets
    /// on one schedule share one copy instead of holding 10,000.
    static PARSED: RefCell<HashMap<String, Schedule>> = RefCell::new(HashMap::new());
}

/// Why a schedule is refused; each names the expression it was given.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{expression:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week)")]
    FieldCount { expression: String },
    #[error("{expression:?}: {source}")]
    Weekday {
        expression: String,
        #[source]
        source: WeekdayError,
    },
    #[error("{expression:?} is not a valid cron expression: {source}")]
    Cron {
        expression: String,
        #[source]
        source: cron::error::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum WeekdayError {
    #[error("day-of-week {0} is not 0-7")]
    OutOfRange(String),
    #[error("day-of-week {0:?} is not a number or a name")]
    NotANumber(String),
}

/// Config collects every field's problem as text, reported together.
impl From<ScheduleError> for String {
    fn from(error: ScheduleError) -> String {
        error.to_string()
    }
}

impl std::str::FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(expression: &str) -> Result<Schedule, ScheduleError> {
        Schedule::parse(expression)
    }
}

impl Schedule {
    pub fn parse(expression: &str) -> Result<Schedule, ScheduleError> {
        if let Some(known) = PARSED.with(|parsed| parsed.borrow().get(expression).cloned()) {
            return Ok(known);
        }
        let schedule = Self::parse_new(expression)?;
        PARSED.with(|parsed| {
            parsed
                .borrow_mut()
                .insert(expression.to_string(), schedule.clone())
        });
        Ok(schedule)
    }

    fn parse_new(expression: &str) -> Result<Schedule, ScheduleError> {
        let mut fields: Vec<&str> = expression.split_whitespace().collect();
        let seconds = match fields.len() {
            5 => "0",
            6 => fields.remove(0),
            _ => {
                return Err(ScheduleError::FieldCount {
                    expression: expression.to_string(),
                })
            }
        };
        let weekday = crontab_weekdays(fields[4]).map_err(|source| ScheduleError::Weekday {
            expression: expression.to_string(),
            source,
        })?;
        // The cron crate wants seconds first and numbers weekdays 1 (Sunday) to 7.
        let text = format!(
            "{seconds} {} {} {} {} {weekday}",
            fields[0], fields[1], fields[2], fields[3]
        );
        let cron = cron::Schedule::from_str(&text).map_err(|source| ScheduleError::Cron {
            expression: expression.to_string(),
            source,
        })?;
        Ok(Schedule {
            expression: expression.into(),
            cron: Arc::new(cron),
        })
    }

    /// The first fire strictly after `time`.
    pub fn next_after(&self, time: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.after(&time).next()
    }

    /// The longest gap between the next 60 consecutive fires (weekly → 7 days).
    pub fn period(&self) -> Option<std::time::Duration> {
        let fires: Vec<DateTime<Utc>> = self.cron.upcoming(Utc).take(60).collect();
        fires
            .windows(2)
            .filter_map(|w| (w[1] - w[0]).to_std().ok())
            .max()
    }

    /// The newest fire in `(after, until]`, if any.
    pub fn latest_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.cron.after(&after).take_while(|t| *t <= until).last()
    }
}

/// Crontab numbers weekdays 0-7 with 0 and 7 both Sunday; names pass through.
fn crontab_weekdays(field: &str) -> Result<String, WeekdayError> {
    let translate = |n: &str| -> Result<u32, WeekdayError> {
        match n.parse::<u32>() {
            Ok(d @ 0..=7) => Ok(d % 7 + 1),
            Ok(_) => Err(WeekdayError::OutOfRange(n.to_string())),
            Err(_) => Err(WeekdayError::NotANumber(n.to_string())),
        }
    };
    let is_number = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mut parts = Vec::new();
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let translated = match range.split_once('-') {
            Some((a, b)) if is_number(a) && is_number(b) => {
                let (a, b) = (translate(a)?, translate(b)?);
                // "5-7" (Friday to Sunday) becomes 6-7 plus Sunday, which is 1 in the crate.
                if b == 1 && a != 1 {
                    parts.push("1".to_string());
                    format!("{a}-7")
                } else {
                    format!("{a}-{b}")
                }
            }
            None if is_number(range) => translate(range)?.to_string(),
            _ => range.to_string(),
        };
        parts.push(match step {
            Some(step) => format!("{translated}/{step}"),
            None => translated,
        });
    }
    Ok(parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Weekday};

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    #[test]
    fn sunday_is_0_7_or_sun() {
        // 2026-11-28 is a Saturday.
        let from = at(2026, 11, 28, 12, 0);
        for expr in ["0 3 * * SUN", "0 3 * * 0", "0 3 * * 7", "0 3 * * Sun"] {
            let next = Schedule::parse(expr).unwrap().next_after(from).unwrap();
            assert_eq!(next, at(2026, 11, 29, 3, 0), "{expr}");
        }
    }

    #[test]
    fn weekday_ranges_mean_what_crontab_means() {
        let weekdays = Schedule::parse("30 2 * * 1-5").unwrap();
        let mut t = at(2026, 11, 28, 0, 0);
        let mut days = Vec::new();
        for _ in 0..5 {
            t = weekdays.next_after(t).unwrap();
            days.push(t.weekday());
        }
        assert_eq!(
            days,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        let weekend = Schedule::parse("0 0 * * 5-7").unwrap();
        let mut t = at(2026, 11, 23, 0, 0);
        let mut days = Vec::new();
        for _ in 0..3 {
            t = weekend.next_after(t).unwrap();
            days.push(t.weekday());
        }
        assert_eq!(days, [Weekday::Fri, Weekday::Sat, Weekday::Sun]);
    }

    #[test]
    fn steps_and_latest_fire() {
        let every5 = Schedule::parse("*/5 * * * *").unwrap();
        assert_eq!(
            every5.next_after(at(2026, 1, 1, 0, 1)).unwrap(),
            at(2026, 1, 1, 0, 5)
        );
        assert_eq!(
            every5.latest_between(at(2026, 1, 1, 0, 1), at(2026, 1, 1, 0, 17)),
            Some(at(2026, 1, 1, 0, 15))
        );
        assert_eq!(
            every5.latest_between(at(2026, 1, 1, 0, 1), at(2026, 1, 1, 0, 4)),
            None
        );
    }

    #[test]
    fn a_leading_seconds_field_is_accepted() {
        let every10s = Schedule::parse("*/10 * * * * *").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap();
        assert_eq!(
            every10s.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 10).unwrap()
        );
    }

    #[test]
    fn period_is_the_longest_gap() {
        let weekly = Schedule::parse("0 3 * * SUN").unwrap();
        assert_eq!(
            weekly.period(),
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        let weekdays = Schedule::parse("0 3 * * 1-5").unwrap();
        assert_eq!(
            weekdays.period(),
            Some(std::time::Duration::from_secs(3 * 86400))
        );
    }

    #[test]
    fn rejects_bad_expressions() {
        assert!(Schedule::parse("0 3 * *").is_err());
        assert!(Schedule::parse("0 3 * * 8").is_err());
        assert!(Schedule::parse("61 3 * * *").is_err());
        assert!(Schedule::parse("0 3 * * MON-FUNDAY").is_err());
    }
}
