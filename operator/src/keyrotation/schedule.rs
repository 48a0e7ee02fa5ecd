//! When rotations (and backups) are due: five-field cron expressions in UTC
//! or fixed intervals, against an injectable clock.
//!
//! Everything here is pure arithmetic on [`Timestamp`]s: cron expressions are
//! evaluated on UTC civil date-times (so daylight saving time does not exist),
//! and days in durations are always 24 hours.
//!
//! A controller keeps the last slot it executed (not the time it ran) and asks
//! [`Cadence::due_slot`] on every reconcile. Slots missed while the operator
//! was down collapse into one, the latest: never a burst of catch-ups.

use std::sync::Mutex;

use croner::parser::{CronParser, Seconds, Year};
use k8s_openapi::jiff::civil::DateTime;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::conditions::Clock;
use crate::fhirendpoint::validate::InvalidSpec;

/// Parses the `DURATION_PATTERN` language: one or more whole numbers each
/// followed by a unit `s`, `m`, `h` or `d` (24 hours), summed: `30s`, `15m`,
/// `24h`, `90d`, `1h30m`. `None` for anything else, for zero, and for a sum
/// that does not fit in a [`SignedDuration`].
pub fn parse_duration(text: &str) -> Option<SignedDuration> {
    let seconds = sum_of_units(text, |unit| match unit {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86_400),
        _ => None,
    })?;
    Some(SignedDuration::from_secs(i64::try_from(seconds).ok()?))
}

/// The sum of `<whole number><unit>` terms, each unit's size in seconds
/// given by `unit`: `None` for empty text, an unknown unit, a number
/// without a unit, zero, or overflow. Shared by the durations of the specs.
pub fn sum_of_units(text: &str, unit: impl Fn(char) -> Option<u64>) -> Option<u64> {
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            number = Some(number.unwrap_or(0).checked_mul(10)?.checked_add(u64::from(digit))?);
            continue;
        }
        total = total.checked_add(number.take()?.checked_mul(unit(c)?)?)?;
    }
    (number.is_none() && total > 0).then_some(total)
}

/// A parsed five-field cron expression (or `@hourly`-style shorthand),
/// evaluated in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr {
    expression: String,
    cron: Box<croner::Cron>,
}

impl CronExpr {
    /// The expression as written in the spec.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let civil = TimeZone::UTC.to_datetime(t);
        let next: DateTime = self.cron.find_next_occurrence(&civil, false).ok()?;
        let next = TimeZone::UTC.to_timestamp(next).ok()?;
        // croner ignores sub-second parts; the slot must still be strictly after `t`.
        (next > t).then_some(next)
    }

    /// The latest slot at or before `t`.
    fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        let civil = TimeZone::UTC.to_datetime(t);
        let previous: DateTime = self.cron.find_previous_occurrence(&civil, true).ok()?;
        let previous = TimeZone::UTC.to_timestamp(previous).ok()?;
        (previous <= t).then_some(previous)
    }
}

/// How often something happens: at the times of a cron expression, or every
/// fixed interval counted from an anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cadence {
    Cron(CronExpr),
    /// Slots are `anchor + k * interval` for k = 1, 2, …
    Interval(SignedDuration),
}

/// The reference point from which `cadence` checks that an expression ever
/// fires. Without a year field a pattern repeats every 400 years (the
/// Gregorian cycle, weekdays included), which the search spans.
const NEVER_CHECK_FROM: Timestamp = Timestamp::UNIX_EPOCH;

/// Reads `{prefix}.schedule` (cron, UTC) or `{prefix}.interval` (duration):
/// exactly one must be set. The error names the field and says what is wrong.
pub fn cadence(schedule: Option<&str>, interval: Option<&str>, field_prefix: &str) -> Result<Cadence, InvalidSpec> {
    let schedule_field = format!("{field_prefix}.schedule");
    let interval_field = format!("{field_prefix}.interval");
    match (schedule, interval) {
        (Some(_), Some(_)) => Err(invalid(
            &interval_field,
            format!("must not be set together with {schedule_field}: set exactly one of them"),
        )),
        (None, None) => {
            Err(invalid(&schedule_field, format!("one of {schedule_field} or {interval_field} is required")))
        }
        (Some(expression), None) => parse_cron(expression, &schedule_field).map(Cadence::Cron),
        (None, Some(text)) => parse_duration(text).map(Cadence::Interval).ok_or_else(|| {
            invalid(
                &interval_field,
                format!(
                    "{text:?} is not a positive duration: whole numbers with units s, m, h or d (24 hours), \
                     such as 30d or 1h30m"
                ),
            )
        }),
    }
}

/// The five fields, in order, with the values each allows.
const CRON_FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT, 0 and 7 both Sunday"),
];

/// The shorthands the CRD's `CRON_PATTERN` admits.
const CRON_SHORTHANDS: [&str; 6] = ["@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly"];

fn parse_cron(expression: &str, field: &str) -> Result<CronExpr, InvalidSpec> {
    // Five fields only: no seconds and no year, as the CRD documents.
    let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
    let trimmed = expression.trim();
    if trimmed.starts_with('@') && !CRON_SHORTHANDS.iter().any(|s| s.eq_ignore_ascii_case(trimmed)) {
        return Err(invalid(
            field,
            format!("{expression:?}: unknown shorthand; use one of {}", CRON_SHORTHANDS.join(", ")),
        ));
    }
    let fields = trimmed.split_whitespace().count();
    if !trimmed.starts_with('@') && fields != 5 {
        return Err(invalid(
            field,
            format!(
                "{expression:?} has {fields} fields; a cron expression has five \
                 (minute hour day-of-month month day-of-week) or is one of {}",
                CRON_SHORTHANDS.join(", ")
            ),
        ));
    }
    let cron = parser.parse(trimmed).map_err(|e| {
        let problem = locate_cron_error(&parser, trimmed).unwrap_or_else(|| cron_error_text(&e));
        invalid(field, format!("{expression:?}: {problem}"))
    })?;
    let parsed = CronExpr { expression: expression.to_owned(), cron: Box::new(cron) };
    if parsed.next_after(NEVER_CHECK_FROM).is_none() {
        return Err(invalid(
            field,
            format!(
                "{expression:?} never fires: no date matches its day-of-month, month and day-of-week fields (like 30 February)"
            ),
        ));
    }
    Ok(parsed)
}

/// Names the first field that croner refuses on its own (the others set to
/// `*`), with the values it allows. croner's own messages do not say which
/// field is wrong.
fn locate_cron_error(parser: &CronParser, expression: &str) -> Option<String> {
    let parts: Vec<&str> = expression.split_whitespace().collect();
    if parts.len() != CRON_FIELDS.len() {
        return None;
    }
    parts.iter().zip(CRON_FIELDS).enumerate().find_map(|(i, (part, (name, allowed)))| {
        let probe: Vec<&str> = (0..parts.len()).map(|j| if j == i { *part } else { "*" }).collect();
        let error = parser.parse(&probe.join(" ")).err()?;
        Some(format!("{name} {part:?}: {} (allowed: {allowed})", cron_error_text(&error)))
    })
}

/// croner's message without its category prefix and final period.
fn cron_error_text(error: &croner::errors::CronError) -> String {
    use croner::errors::CronError;
    let text = match error {
        CronError::ComponentError(m) | CronError::InvalidPattern(m) | CronError::IllegalCharacters(m) => m.clone(),
        other => other.to_string(),
    };
    text.trim_end_matches('.').to_owned()
}

fn invalid(field: &str, message: String) -> InvalidSpec {
    InvalidSpec { field: field.to_owned(), message }
}

impl Cadence {
    /// The first slot strictly after `t`. `anchor` (the creation or last
    /// rotation time) places interval slots and is ignored by cron. `None`
    /// when no slot follows within representable time.
    pub fn next_after(&self, t: Timestamp, anchor: Timestamp) -> Option<Timestamp> {
        match self {
            Cadence::Cron(cron) => cron.next_after(t),
            Cadence::Interval(interval) => {
                let step = positive_nanos(*interval)?;
                let since = t.as_nanosecond() - anchor.as_nanosecond();
                // Smallest k >= 1 with anchor + k * step > t.
                let k = if since < 0 { 1 } else { since / step + 1 };
                interval_slot(anchor, step, k)
            }
        }
    }

    /// The latest slot in `(last, now]`, or in `(anchor, now]` when nothing
    /// ran yet; `None` when nothing is due. Slots missed during downtime
    /// collapse into this one.
    pub fn due_slot(&self, last: Option<Timestamp>, anchor: Timestamp, now: Timestamp) -> Option<Timestamp> {
        let after = last.unwrap_or(anchor);
        let slot = match self {
            Cadence::Cron(cron) => cron.latest_at_or_before(now)?,
            Cadence::Interval(interval) => {
                let step = positive_nanos(*interval)?;
                let k = (now.as_nanosecond() - anchor.as_nanosecond()).div_euclid(step);
                if k < 1 {
                    return None;
                }
                interval_slot(anchor, step, k)?
            }
        };
        (slot > after && slot <= now).then_some(slot)
    }

    /// The gap between the next two slots after `from`: a cron schedule's
    /// interval as it stands at `from` (`0 2 1 * *` gives 28 to 31 days,
    /// `0 2 * * 1-5` one or three days), or the fixed interval.
    /// `SignedDuration::MAX` when two slots no longer follow (only near the
    /// end of representable time).
    pub fn typical_interval(&self, from: Timestamp) -> SignedDuration {
        match self {
            Cadence::Interval(interval) => *interval,
            Cadence::Cron(cron) => cron
                .next_after(from)
                .and_then(|first| Some(cron.next_after(first)?.duration_since(first)))
                .unwrap_or(SignedDuration::MAX),
        }
    }
}

/// How long a controller waits to look again at `at`: at least 200 ms, at
/// most an hour (long timers drift; looking again is cheap).
pub fn wait_until(now: Timestamp, at: Timestamp) -> std::time::Duration {
    let wait = at.duration_since(now).as_millis().max(200) as u64;
    std::time::Duration::from_millis(wait.min(3_600_000))
}

fn positive_nanos(interval: SignedDuration) -> Option<i128> {
    let nanos = interval.as_nanos();
    (nanos > 0).then_some(nanos)
}

fn interval_slot(anchor: Timestamp, step: i128, k: i128) -> Option<Timestamp> {
    let offset = step.checked_mul(k)?;
    Timestamp::from_nanosecond(anchor.as_nanosecond().checked_add(offset)?).ok()
}

/// A clock that moves only when told: for tests of anything that takes a
/// [`Clock`].
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self { now: Mutex::new(start) }
    }

    /// Moves the clock by `by` (negative goes back) and returns the new time.
    /// Saturates at the ends of representable time.
    pub fn advance(&self, by: SignedDuration) -> Timestamp {
        let mut now = self.lock();
        *now = now.checked_add(by).unwrap_or(if by.is_negative() { Timestamp::MIN } else { Timestamp::MAX });
        *now
    }

    /// Sets the clock to `to`.
    pub fn set(&self, to: Timestamp) {
        *self.lock() = to;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timestamp> {
        // A Timestamp is always valid, even after a panic elsewhere.
        self.now.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self.lock()
    }
}
