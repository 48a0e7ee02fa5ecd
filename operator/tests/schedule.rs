//! Schedules over simulated time: cron in UTC, intervals from an anchor,
//! missed slots collapsing into one, and no panic on any input.

use fhir_operator::conditions::Clock;
use fhir_operator::keyrotation::schedule::{Cadence, ManualClock, cadence, parse_duration};
use k8s_openapi::jiff::civil::Weekday;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn cron(expression: &str) -> Cadence {
    cadence(Some(expression), None, "spec").unwrap_or_else(|e| panic!("{expression}: {e}"))
}

fn interval(text: &str) -> Cadence {
    cadence(None, Some(text), "spec").unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

const MIN: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// Any anchor: cron ignores it.
const NO_ANCHOR: Timestamp = Timestamp::UNIX_EPOCH;

/// The `n` slots strictly after `from`, each found from the one before.
fn slots(c: &Cadence, from: Timestamp, anchor: Timestamp, n: usize) -> Vec<Timestamp> {
    let mut out = Vec::with_capacity(n);
    let mut t = from;
    for _ in 0..n {
        t = c.next_after(t, anchor).expect("a next slot");
        out.push(t);
    }
    out
}

/// Every slot in `(from, to]`.
fn slots_between(c: &Cadence, from: Timestamp, to: Timestamp, anchor: Timestamp) -> Vec<Timestamp> {
    let mut out = Vec::new();
    let mut t = from;
    while let Some(next) = c.next_after(t, anchor).filter(|n| *n <= to) {
        out.push(next);
        t = next;
    }
    out
}

/// Asserts the first cron slot strictly after each `from` (RFC 3339 texts).
fn assert_next_after(c: &Cadence, cases: &[(&str, &str)]) {
    for (from, expected) in cases {
        assert_eq!(c.next_after(ts(from), NO_ANCHOR), Some(ts(expected)), "after {from}");
    }
}

fn utc_weekday(t: Timestamp) -> Weekday {
    TimeZone::UTC.to_datetime(t).weekday()
}

/// A small deterministic generator, so that the property loops are repeatable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------- durations

#[test]
fn durations_each_unit_and_combinations() {
    for (text, seconds) in [
        ("30s", 30),
        ("15m", 15 * MIN),
        ("24h", 24 * HOUR),
        ("90d", 90 * DAY),
        ("1d", DAY),
        ("1h30m", HOUR + 30 * MIN),
        ("1d12h", DAY + 12 * HOUR),
        ("2h45m30s", 2 * HOUR + 45 * MIN + 30),
        ("720h", 30 * DAY),
        // The pattern does not order units; Go sums repeats, so do we.
        ("30m1h", HOUR + 30 * MIN),
        ("1h1h", 2 * HOUR),
        // A zero part is fine when the whole is not zero; leading zeros too.
        ("0h5m", 5 * MIN),
        ("007s", 7),
        // The largest value that fits.
        ("9223372036854775807s", i64::MAX),
        ("106751991167300d", 106_751_991_167_300 * DAY),
    ] {
        assert_eq!(parse_duration(text), Some(secs(seconds)), "{text}");
    }
}

#[test]
fn durations_zero_overflow_and_garbage_refused() {
    for text in [
        // zero
        "0s",
        "0d",
        "0h0m0s",
        "000m",
        // overflow of i64 seconds, in a part or in the sum
        "9223372036854775808s",
        "106751991167301d",
        "9223372036854775807s1s",
        "99999999999999999999999999999999d",
        // not the DURATION_PATTERN language
        "",
        "s",
        "h1",
        "30",
        "1H",
        "1w",
        "1y",
        "1ms",
        "1us",
        "1.5h",
        "-1h",
        "+1h",
        " 1h",
        "1h ",
        "1h 30m",
        "1h_30m",
        "P1D",
        "١h",
        "１h",
        "1ʰ",
        "1h\0",
    ] {
        assert_eq!(parse_duration(text), None, "{text:?}");
    }
}

// ---------------------------------------------------------------- spec parsing

#[test]
fn cadence_requires_exactly_one_of_schedule_and_interval() {
    let both = cadence(Some("@daily"), Some("1d"), "spec").unwrap_err();
    assert_eq!(both.field, "spec.interval");
    assert!(both.message.contains("spec.schedule"), "{both}");

    let neither = cadence(None, None, "spec").unwrap_err();
    assert_eq!(neither.field, "spec.schedule");
    assert_eq!(neither.to_string(), "spec.schedule: one of spec.schedule or spec.interval is required");

    // The prefix places nested fields, e.g. a BackupPolicy's restore drill.
    let drill = cadence(Some("61 * * * *"), None, "spec.restoreDrill").unwrap_err();
    assert_eq!(drill.field, "spec.restoreDrill.schedule");

    assert!(matches!(cron("@daily"), Cadence::Cron(c) if c.expression() == "@daily"));
    assert_eq!(interval("90d"), Cadence::Interval(secs(90 * DAY)));
}

#[test]
fn invalid_interval_names_the_field() {
    for text in ["", "0s", "1w", "1h 30m", "9223372036854775808s"] {
        let error = cadence(None, Some(text), "spec").unwrap_err();
        assert_eq!(error.field, "spec.interval", "{text:?}");
        assert!(error.message.starts_with(&format!("{text:?} is not a positive duration")), "{error}");
    }
}

#[test]
fn invalid_cron_names_the_field_and_what_is_wrong() {
    for (expression, expected) in [
        ("61 * * * *", r#"spec.schedule: "61 * * * *": minute "61": Number out of bounds (allowed: 0-59)"#),
        ("0 24 * * *", r#"spec.schedule: "0 24 * * *": hour "24": Number out of bounds (allowed: 0-23)"#),
        ("0 0 32 * *", r#"spec.schedule: "0 0 32 * *": day-of-month "32": Number out of bounds (allowed: 1-31)"#),
        ("0 0 0 * *", r#"spec.schedule: "0 0 0 * *": day-of-month "0": Number out of bounds (allowed: 1-31)"#),
        ("0 0 * 13 *", r#"spec.schedule: "0 0 * 13 *": month "13": Number out of bounds (allowed: 1-12 or JAN-DEC)"#),
        (
            "0 0 * * 8",
            r#"spec.schedule: "0 0 * * 8": day-of-week "8": Number out of bounds (allowed: 0-7 or SUN-SAT, 0 and 7 both Sunday)"#,
        ),
        ("*/0 * * * *", r#"spec.schedule: "*/0 * * * *": minute "*/0": Step cannot be zero (allowed: 0-59)"#),
        ("5-1 * * * *", r#"spec.schedule: "5-1 * * * *": minute "5-1": Range out of bounds (allowed: 0-59)"#),
        (
            "0 0 * * *\u{2028}x",
            "spec.schedule: \"0 0 * * *\\u{2028}x\" has 6 fields; a cron expression has five (minute hour \
             day-of-month month day-of-week) or is one of @yearly, @annually, @monthly, @weekly, @daily, @hourly",
        ),
        (
            "@foo",
            r#"spec.schedule: "@foo": unknown shorthand; use one of @yearly, @annually, @monthly, @weekly, @daily, @hourly"#,
        ),
        (
            "@reboot",
            r#"spec.schedule: "@reboot": unknown shorthand; use one of @yearly, @annually, @monthly, @weekly, @daily, @hourly"#,
        ),
        (
            "0 0 30 2 *",
            r#"spec.schedule: "0 0 30 2 *" never fires: no date matches its day-of-month, month and day-of-week fields (like 30 February)"#,
        ),
        (
            "0 0 31 4,6,9,11 *",
            r#"spec.schedule: "0 0 31 4,6,9,11 *" never fires: no date matches its day-of-month, month and day-of-week fields (like 30 February)"#,
        ),
        (
            // croner's `+`: the 1st of a month AND its fifth Sunday.
            "0 0 1 * +0#5",
            r#"spec.schedule: "0 0 1 * +0#5" never fires: no date matches its day-of-month, month and day-of-week fields (like 30 February)"#,
        ),
    ] {
        let error = cadence(Some(expression), None, "spec").unwrap_err();
        assert_eq!(error.to_string(), expected, "{expression:?}");
    }

    // Field counts: seconds and years are not part of the CRD's language.
    for (expression, fields) in [("", 0), ("* * * *", 4), ("0 * * * * *", 6), ("0 0 0 1 1 * 2030", 7)] {
        let error = cadence(Some(expression), None, "spec").unwrap_err();
        assert!(error.message.contains(&format!("has {fields} fields")), "{error}");
    }
    // Non-standard step shorthand (croner 4 refuses it by default).
    let error = cadence(Some("5/5 * * * *"), None, "spec").unwrap_err();
    assert!(error.message.contains(r#"minute "5/5": Invalid step syntax"#), "{error}");
    // Letters that are not names.
    let error = cadence(Some("a * * * *"), None, "spec").unwrap_err();
    assert!(error.message.contains(r#"minute "a": "#), "{error}");
}

// ---------------------------------------------------------------- cron in UTC

#[test]
fn first_of_month_across_months_of_28_29_30_and_31_days() {
    let c = cron("0 2 1 * *");
    let got = slots(&c, ts("2027-01-15T00:00:00Z"), NO_ANCHOR, 26);
    let mut expected = Vec::new();
    for year in [2027, 2028, 2029] {
        for month in 1..=12 {
            expected.push(ts(&format!("{year}-{month:02}-01T02:00:00Z")));
        }
    }
    assert_eq!(got, expected[1..27].to_vec());

    // The gaps follow the month lengths, leap February 2028 included.
    let days: Vec<i64> = got.windows(2).map(|w| w[1].duration_since(w[0]).as_secs() / DAY).collect();
    assert_eq!(
        days,
        [
            28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, // Feb 2027 .. Jan 2028
            29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, // Feb 2028 .. Jan 2029
            28, // Feb 2029
        ]
    );
    assert!(got.windows(2).all(|w| w[1].duration_since(w[0]).as_secs() % DAY == 0));

    // Strictly after: a slot is not its own successor.
    assert_next_after(
        &c,
        &[("2028-02-01T02:00:00Z", "2028-03-01T02:00:00Z"), ("2028-02-01T01:59:59.999Z", "2028-02-01T02:00:00Z")],
    );
}

#[test]
fn february_29_is_years_away() {
    let c = cron("0 0 29 2 *");
    assert_next_after(
        &c,
        &[
            ("2025-06-01T00:00:00Z", "2028-02-29T00:00:00Z"),
            ("2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"),
            // 2100 is not a leap year: eight years between slots.
            ("2096-03-01T00:00:00Z", "2104-02-29T00:00:00Z"),
        ],
    );
    assert_eq!(c.typical_interval(ts("2025-06-01T00:00:00Z")), secs(1461 * DAY));
    // Nothing due for years, then exactly that day.
    assert_eq!(c.due_slot(None, ts("2025-06-01T00:00:00Z"), ts("2028-02-28T23:59:59Z")), None);
    assert_eq!(
        c.due_slot(None, ts("2025-06-01T00:00:00Z"), ts("2028-02-29T00:00:00Z")),
        Some(ts("2028-02-29T00:00:00Z"))
    );
}

#[test]
fn every_fifteen_minutes() {
    let c = cron("*/15 * * * *");
    assert_next_after(
        &c,
        &[
            ("2025-01-01T10:07:30Z", "2025-01-01T10:15:00Z"),
            ("2025-01-01T10:15:00Z", "2025-01-01T10:30:00Z"),
            ("2025-01-01T23:50:00Z", "2025-01-02T00:00:00Z"),
        ],
    );
    let day = slots_between(&c, ts("2025-01-01T00:00:00Z"), ts("2025-01-02T00:00:00Z"), NO_ANCHOR);
    assert_eq!(day.len(), 96);
    assert!(day.windows(2).all(|w| w[1].duration_since(w[0]) == secs(15 * MIN)));
    assert_eq!(c.typical_interval(ts("2025-01-01T10:07:30Z")), secs(15 * MIN));
    assert_eq!(c.due_slot(Some(ts("2025-01-01T10:00:00Z")), NO_ANCHOR, ts("2025-01-01T10:14:59.999Z")), None);
    assert_eq!(
        c.due_slot(Some(ts("2025-01-01T10:00:00Z")), NO_ANCHOR, ts("2025-01-01T10:15:00.001Z")),
        Some(ts("2025-01-01T10:15:00Z"))
    );
}

#[test]
fn shorthands_match_their_five_field_forms() {
    let from = ts("2025-05-14T13:37:00Z");
    for (shorthand, five) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        // croner reads shorthands case-insensitively (the CRD pattern only admits lower case).
        ("@DAILY", "0 0 * * *"),
    ] {
        assert_eq!(
            slots(&cron(shorthand), from, NO_ANCHOR, 30),
            slots(&cron(five), from, NO_ANCHOR, 30),
            "{shorthand}"
        );
    }
    assert_eq!(slots(&cron("@daily"), from, NO_ANCHOR, 2), [ts("2025-05-15T00:00:00Z"), ts("2025-05-16T00:00:00Z")]);
    // @weekly is Sunday midnight UTC: 2025-05-18 is a Sunday.
    let weekly = slots(&cron("@weekly"), from, NO_ANCHOR, 3);
    assert_eq!(weekly, [ts("2025-05-18T00:00:00Z"), ts("2025-05-25T00:00:00Z"), ts("2025-06-01T00:00:00Z")]);
    assert!(weekly.iter().all(|t| utc_weekday(*t) == Weekday::Sunday));
    assert_eq!(cron("@weekly").typical_interval(from), secs(7 * DAY));
    assert_eq!(cron("@hourly").typical_interval(from), secs(HOUR));
    assert_eq!(cron("@yearly").next_after(from, NO_ANCHOR), Some(ts("2026-01-01T00:00:00Z")));
}

#[test]
fn sunday_is_day_of_week_0_and_7() {
    let from = ts("2025-01-01T00:00:00Z");
    let zero = slots(&cron("0 0 * * 0"), from, NO_ANCHOR, 53);
    assert_eq!(zero, slots(&cron("0 0 * * 7"), from, NO_ANCHOR, 53));
    assert_eq!(zero, slots(&cron("0 0 * * SUN"), from, NO_ANCHOR, 53));
    assert_eq!(zero, slots(&cron("0 0 * * sun"), from, NO_ANCHOR, 53));
    assert!(zero.iter().all(|t| utc_weekday(*t) == Weekday::Sunday));
    // A range may end on 7: Friday to Sunday.
    let weekend = slots(&cron("0 0 * * 5-7"), from, NO_ANCHOR, 30);
    assert!(weekend.iter().all(|t| matches!(utc_weekday(*t), Weekday::Friday | Weekday::Saturday | Weekday::Sunday)));
    assert_eq!(weekend.iter().filter(|t| utc_weekday(**t) == Weekday::Sunday).count(), 10);
}

#[test]
fn weekdays_at_two() {
    let c = cron("0 2 * * 1-5");
    // 2025-03-03 is a Monday; four weeks hold twenty slots, none on a weekend.
    let got = slots_between(&c, ts("2025-03-03T00:00:00Z"), ts("2025-03-31T00:00:00Z"), NO_ANCHOR);
    assert_eq!(got.len(), 20);
    assert!(got.iter().all(|t| !matches!(utc_weekday(*t), Weekday::Saturday | Weekday::Sunday)));
    assert!(got.iter().all(|t| TimeZone::UTC.to_datetime(*t).time().to_string() == "02:00:00"));
    // The gap depends on where one stands: Friday → Monday is three days.
    assert_eq!(c.typical_interval(ts("2025-03-04T03:00:00Z")), secs(DAY));
    assert_eq!(c.typical_interval(ts("2025-03-06T03:00:00Z")), secs(3 * DAY));
    assert_eq!(c.next_after(ts("2025-03-07T02:00:00Z"), NO_ANCHOR), Some(ts("2025-03-10T02:00:00Z")));
}

#[test]
fn day_of_month_or_day_of_week_like_vixie_cron() {
    // Both restricted: either may match (Vixie cron), not both at once.
    let c = cron("0 0 13 * 5");
    let got = slots_between(&c, ts("2025-06-01T00:00:00Z"), ts("2025-06-30T23:59:59Z"), NO_ANCHOR);
    let days: Vec<i8> = got.iter().map(|t| TimeZone::UTC.to_datetime(*t).day()).collect();
    assert_eq!(days, [6, 13, 20, 27]); // Fridays in June 2025, and the 13th (a Friday).
    let got = slots_between(&c, ts("2025-07-01T00:00:00Z"), ts("2025-07-31T23:59:59Z"), NO_ANCHOR);
    let days: Vec<i8> = got.iter().map(|t| TimeZone::UTC.to_datetime(*t).day()).collect();
    assert_eq!(days, [4, 11, 13, 18, 25]);
}

#[test]
fn dst_switch_dates_are_ordinary_days_in_utc() {
    // US: 2025-03-09 and 2025-11-02; EU: 2025-03-30 and 2025-10-26.
    for day in ["2025-03-09", "2025-03-30", "2025-10-26", "2025-11-02", "2026-03-08", "2026-03-29"] {
        let midnight = ts(&format!("{day}T00:00:00Z"));
        let before = midnight.checked_sub(secs(3 * DAY)).unwrap();
        for (expression, step) in
            [("0 2 * * *", DAY), ("30 1 * * *", DAY), ("0 * * * *", HOUR), ("*/15 * * * *", 15 * MIN)]
        {
            let c = cron(expression);
            let got = slots_between(&c, before, midnight.checked_add(secs(3 * DAY)).unwrap(), NO_ANCHOR);
            assert_eq!(got.len() as i64, 6 * DAY / step, "{expression} around {day}");
            assert!(got.windows(2).all(|w| w[1].duration_since(w[0]) == secs(step)), "{expression} around {day}");
            assert_eq!(c.typical_interval(midnight), secs(step));
        }
        // The switch day's 02:00 and 01:30 exist once, at exactly those UTC times.
        assert_eq!(cron("0 2 * * *").next_after(midnight, NO_ANCHOR), Some(ts(&format!("{day}T02:00:00Z"))));
        assert_eq!(cron("30 1 * * *").next_after(midnight, NO_ANCHOR), Some(ts(&format!("{day}T01:30:00Z"))));
    }
}

// ---------------------------------------------------------------- simulated time

/// Drives `clock` in steps of `step` until `end`, executing whenever a slot
/// is due after `last` (the last slot executed); returns the executed slots
/// and the times they ran.
fn simulate(
    c: &Cadence,
    clock: &ManualClock,
    anchor: Timestamp,
    step: SignedDuration,
    end: Timestamp,
    mut last: Option<Timestamp>,
) -> Vec<(Timestamp, Timestamp)> {
    let mut runs = Vec::new();
    while clock.now() < end {
        let now = clock.advance(step);
        if let Some(slot) = c.due_slot(last, anchor, now) {
            runs.push((slot, now));
            last = Some(slot);
        }
    }
    runs
}

#[test]
fn three_months_every_six_hours_in_seven_minute_steps() {
    let c = cron("0 */6 * * *");
    let created = ts("2025-01-01T00:03:00Z");
    let clock = ManualClock::new(created);
    let runs = simulate(&c, &clock, created, secs(7 * MIN), ts("2025-04-01T00:03:00Z"), None);

    // Slots in (created, end]: 18:00 back to 06:00 on 1 Jan, four a day
    // for 2 Jan .. 31 Mar (89 days), and 00:00 on 1 April.
    assert_eq!(runs.len(), 3 + 89 * 4 + 1);
    assert_eq!(runs.first().unwrap().0, ts("2025-01-01T06:00:00Z"));
    assert_eq!(runs.last().unwrap().0, ts("2025-04-01T00:00:00Z"));
    let mut previous = created;
    for (slot, ran) in &runs {
        // Every execution is a slot, the very next one, run within one step.
        assert_eq!(Some(*slot), c.next_after(previous, created));
        let civil = TimeZone::UTC.to_datetime(*slot);
        assert!(civil.hour() % 6 == 0 && civil.minute() == 0 && civil.second() == 0 && civil.subsec_nanosecond() == 0);
        assert!(*ran >= *slot && ran.duration_since(*slot) < secs(7 * MIN), "{slot} ran at {ran}");
        previous = *slot;
    }
}

#[test]
fn a_leap_year_of_monthly_in_hourly_steps() {
    let c = cron("@monthly");
    let created = ts("2027-12-31T23:30:00Z");
    let clock = ManualClock::new(created);
    let runs = simulate(&c, &clock, created, secs(HOUR), ts("2028-12-31T23:30:00Z"), None);
    let expected: Vec<Timestamp> = (1..=12).map(|m| ts(&format!("2028-{m:02}-01T00:00:00Z"))).collect();
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), expected);
    assert!(runs.iter().all(|(slot, ran)| ran.duration_since(*slot) == secs(30 * MIN)));
}

#[test]
fn ten_days_of_downtime_give_one_catch_up_then_the_normal_cadence() {
    let c = cron("0 * * * *");
    let created = ts("2025-03-01T00:10:00Z");
    let clock = ManualClock::new(created);
    let mut runs = simulate(&c, &clock, created, secs(5 * MIN), ts("2025-03-02T00:10:00Z"), None);
    assert_eq!(runs.len(), 24);
    let mut last = runs.last().map(|r| r.0);
    assert_eq!(last, Some(ts("2025-03-02T00:00:00Z")));

    // The operator is down for ten days and 25 minutes: 240 slots missed.
    let now = clock.advance(secs(10 * DAY + 25 * MIN));
    assert_eq!(now, ts("2025-03-12T00:35:00Z"));
    let catch_up = c.due_slot(last, created, now);
    assert_eq!(catch_up, Some(ts("2025-03-12T00:00:00Z")), "the latest missed slot, once");
    runs.push((catch_up.unwrap(), now));
    last = catch_up;
    // Nothing more is due until the next slot: no burst.
    for _ in 0..4 {
        let now = clock.advance(secs(5 * MIN));
        assert_eq!(c.due_slot(last, created, now), None, "at {now}");
    }
    // Then hourly again.
    let resumed = simulate(&c, &clock, created, secs(5 * MIN), ts("2025-03-13T00:05:00Z"), last);
    assert_eq!(resumed.first().map(|r| r.0), Some(ts("2025-03-12T01:00:00Z")));
    assert_eq!(resumed.len(), 24);
    assert!(resumed.windows(2).all(|w| w[1].0.duration_since(w[0].0) == secs(HOUR)));
    assert_eq!(runs.len() + resumed.len(), 24 + 1 + 24);
}

// ---------------------------------------------------------------- intervals

#[test]
fn interval_slots_count_from_the_anchor() {
    let c = interval("1h30m");
    let anchor = ts("2025-01-01T10:00:00.5Z");
    let slot = |k: i64| anchor.checked_add(secs(k * 90 * MIN)).unwrap();
    // The anchor itself is not a slot: it is when the last rotation happened.
    assert_eq!(c.next_after(anchor, anchor), Some(slot(1)));
    assert_eq!(c.next_after(ts("2024-12-01T00:00:00Z"), anchor), Some(slot(1)));
    assert_eq!(c.next_after(slot(1), anchor), Some(slot(2)));
    assert_eq!(c.next_after(slot(7).checked_sub(secs(1)).unwrap(), anchor), Some(slot(7)));
    // Sub-second anchors are kept exactly.
    assert_eq!(slot(3).subsec_nanosecond(), 500_000_000);

    assert_eq!(c.due_slot(None, anchor, anchor), None);
    assert_eq!(c.due_slot(None, anchor, slot(1).checked_sub(SignedDuration::from_nanos(1)).unwrap()), None);
    assert_eq!(c.due_slot(None, anchor, slot(1)), Some(slot(1)));
    assert_eq!(c.due_slot(Some(slot(1)), anchor, slot(1)), None);
    assert_eq!(c.due_slot(Some(slot(1)), anchor, slot(2)), Some(slot(2)));
    // A clock before the anchor has nothing due.
    assert_eq!(c.due_slot(None, anchor, ts("2024-12-01T00:00:00Z")), None);
}

#[test]
fn ninety_days_over_a_year() {
    let c = interval("90d");
    let anchor = ts("2025-02-03T04:05:06Z");
    let clock = ManualClock::new(anchor);
    let runs = simulate(&c, &clock, anchor, secs(HOUR), anchor.checked_add(secs(365 * DAY)).unwrap(), None);
    let expected: Vec<Timestamp> = (1..=4).map(|k| anchor.checked_add(secs(k * 90 * DAY)).unwrap()).collect();
    assert_eq!(runs.iter().map(|r| r.0).collect::<Vec<_>>(), expected);
    // Hourly steps from the anchor land exactly on each slot.
    assert!(runs.iter().all(|(slot, ran)| slot == ran));
}

#[test]
fn jumping_past_several_intervals_yields_one_due_slot() {
    let c = interval("24h");
    let anchor = ts("2025-01-01T12:00:00Z");
    let now = ts("2025-01-07T00:00:00Z"); // 5.5 intervals later
    assert_eq!(c.due_slot(None, anchor, now), Some(ts("2025-01-06T12:00:00Z")));
    assert_eq!(c.due_slot(Some(ts("2025-01-02T12:00:00Z")), anchor, now), Some(ts("2025-01-06T12:00:00Z")));
    assert_eq!(c.due_slot(Some(ts("2025-01-06T12:00:00Z")), anchor, now), None);
    assert_eq!(c.next_after(now, anchor), Some(ts("2025-01-07T12:00:00Z")));
}

#[test]
fn typical_interval_for_cron_and_interval() {
    assert_eq!(interval("90d").typical_interval(ts("2025-01-01T00:00:00Z")), secs(90 * DAY));
    assert_eq!(interval("1h30m").typical_interval(Timestamp::MAX), secs(90 * MIN));
    let nightly = cron("0 2 * * *");
    assert_eq!(nightly.typical_interval(ts("2025-03-09T01:00:00Z")), secs(DAY));
    let monthly = cron("0 2 1 * *");
    assert_eq!(monthly.typical_interval(ts("2027-01-15T00:00:00Z")), secs(28 * DAY));
    assert_eq!(monthly.typical_interval(ts("2028-01-15T00:00:00Z")), secs(29 * DAY));
    assert_eq!(monthly.typical_interval(ts("2028-03-15T00:00:00Z")), secs(30 * DAY));
    assert_eq!(monthly.typical_interval(ts("2028-06-15T00:00:00Z")), secs(31 * DAY));
    // Twice the interval, as the backup compliance check uses it.
    assert_eq!(nightly.typical_interval(ts("2025-01-01T00:00:00Z")).checked_mul(2), Some(secs(2 * DAY)));
}

// ---------------------------------------------------------------- properties

#[test]
fn due_slot_agrees_with_walking_the_slots() {
    let mut rng = Lcg(7);
    let base = ts("2024-01-01T00:00:00Z").as_second();
    for expression in ["0 */6 * * *", "*/15 * * * *", "0 2 1 * *", "0 2 * * 1-5", "0 0 29 2 *", "@weekly", "7 3 13 * 5"]
    {
        let c = cron(expression);
        for _ in 0..60 {
            let last = Timestamp::from_second(base + rng.below(3 * 365 * DAY as u64) as i64).unwrap();
            let now = last.checked_add(secs(rng.below(40 * DAY as u64) as i64)).unwrap();
            let walked = slots_between(&c, last, now, NO_ANCHOR).last().copied();
            assert_eq!(c.due_slot(Some(last), NO_ANCHOR, now), walked, "{expression} last {last} now {now}");
        }
    }
    let c = interval("1d7h");
    let anchor = ts("2024-02-29T13:14:15Z");
    for _ in 0..200 {
        let last = anchor.checked_add(secs(rng.below(100 * DAY as u64) as i64)).unwrap();
        let now = last.checked_add(secs(rng.below(10 * DAY as u64) as i64)).unwrap();
        let walked = slots_between(&c, last, now, anchor).last().copied();
        assert_eq!(c.due_slot(Some(last), anchor, now), walked, "last {last} now {now}");
    }
}

#[test]
fn weird_inputs_never_panic() {
    let mut inputs: Vec<String> = [
        "",
        " ",
        "\t\n",
        "@",
        "@@daily",
        "@daily @daily",
        "@foo",
        "@yearlyy",
        "* * * * *",
        "* * * * * *",
        "* * * * * * *",
        "* * * * * * * *",
        "99999999999999999999999 * * * *",
        "-1 * * * *",
        "1-99999999999999999 * * * *",
        "*/99999999999999999999 * * * *",
        "0 0 L * *",
        "0 0 LW * *",
        "0 0 * * 5#L",
        "0 0 * * 5L",
        "0 0 15W * *",
        "0 0 * * +MON",
        "0 0 * * +",
        "0 0 ? * ?",
        "0 0 * * MON#6",
        "0 0 * * #",
        "0 0 * * 1#",
        "0 0 W * *",
        "0 0 L-3 * *",
        ", , , , ,",
        "- - - - -",
        "/ / / / /",
        "*/ * * * *",
        "1-/2 * * * *",
        "ß ß ß ß ß",
        "ǆ * * * *",
        "ﬃ * * * *",
        "İ * * * *",
        "٣ * * * *",
        "🕐 * * * *",
        "\u{0}",
        "0 0 * * SUN-SAT",
        "0 0 * JAN-DEC/2 *",
        "0 0 * * -SUN",
        "0 0 1-31/0 * *",
        "30s",
        "1h30m",
        "9223372036854775807s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let alphabet: Vec<char> = "0123456789*,-/?#LW+@ SUNMOJFBDEC smhdαß🕐\u{2028}\t".chars().collect();
    let mut rng = Lcg(42);
    for _ in 0..3000 {
        let fields = rng.below(8) as usize;
        let text: Vec<String> = (0..fields)
            .map(|_| (0..1 + rng.below(6)).map(|_| alphabet[rng.below(alphabet.len() as u64) as usize]).collect())
            .collect();
        inputs.push(text.join(" "));
    }
    // Cron-shaped inputs, so that many parse and reach evaluation: every
    // operator croner knows, in the fields that allow it, with numbers mostly
    // in range and sometimes not.
    let common = ["*", "*/{a}", "{a}", "{a}-{b}", "{a},{b}", "{a}-{b}/{c}"];
    let extra: [&[&str]; 5] = [
        &[],
        &[],
        &["L", "{a}W", "?", "LW"],
        &["JAN-{a}", "MAR,{a}"],
        &["{a}#{c}", "{a}L", "?", "+{a}", "MON-FRI", "{a}#L", "SUN"],
    ];
    for _ in 0..600 {
        let fields: Vec<String> = extra
            .iter()
            .map(|extra| {
                let n = rng.below((common.len() + extra.len()) as u64) as usize;
                let piece = if n < common.len() { common[n] } else { extra[n - common.len()] };
                let mut number = || match rng.below(10) {
                    0 => (rng.below(70) as i64 - 1).to_string(),
                    _ => (1 + rng.below(7)).to_string(),
                };
                piece.replace("{a}", &number()).replace("{b}", &number()).replace("{c}", &number())
            })
            .collect();
        inputs.push(fields.join(" "));
    }

    let probes = [
        Timestamp::MIN,
        Timestamp::MAX,
        Timestamp::UNIX_EPOCH,
        ts("2025-06-15T12:34:56.789Z"),
        ts("4999-12-31T23:59:59Z"),
        ts("9999-12-30T00:00:00Z"),
    ];
    let mut accepted = 0;
    for text in &inputs {
        let _ = parse_duration(text);
        for (schedule, interval) in [(Some(text.as_str()), None), (None, Some(text.as_str()))] {
            let Ok(c) = cadence(schedule, interval, "spec") else { continue };
            accepted += 1;
            for t in probes {
                if let Some(next) = c.next_after(t, t) {
                    assert!(next > t, "{text:?}: {next} after {t}");
                }
                if let Some(due) = c.due_slot(Some(t), t, t) {
                    panic!("{text:?}: {due} due in an empty range at {t}");
                }
                if let Some(due) = c.due_slot(None, Timestamp::MIN, t) {
                    assert!(due <= t, "{text:?}: {due} due before {t}");
                }
                let _ = c.typical_interval(t);
            }
        }
    }
    println!("{} inputs, {accepted} accepted", inputs.len());
    // The loop reached evaluation, not only refusals.
    assert!(accepted >= 150, "only {accepted} accepted");
}

#[test]
fn extreme_times_and_huge_intervals_give_none_not_panics() {
    let huge = interval("9223372036854775807s");
    assert_eq!(huge.next_after(Timestamp::UNIX_EPOCH, Timestamp::UNIX_EPOCH), None);
    assert_eq!(huge.due_slot(None, Timestamp::MIN, Timestamp::MAX), None);
    assert_eq!(cron("@hourly").next_after(Timestamp::MAX, NO_ANCHOR), None);
    assert_eq!(cron("@yearly").typical_interval(Timestamp::MAX), SignedDuration::MAX);
    // Hand-made intervals that parse_duration never yields are inert.
    assert_eq!(Cadence::Interval(SignedDuration::ZERO).next_after(Timestamp::UNIX_EPOCH, Timestamp::UNIX_EPOCH), None);
    assert_eq!(Cadence::Interval(secs(-60)).due_slot(None, Timestamp::MIN, Timestamp::MAX), None);
}

#[test]
fn manual_clock_moves_only_when_told() {
    let clock = ManualClock::new(ts("2025-01-01T00:00:00Z"));
    let shared: &dyn Clock = &clock;
    assert_eq!(shared.now(), ts("2025-01-01T00:00:00Z"));
    assert_eq!(shared.now(), ts("2025-01-01T00:00:00Z"));
    assert_eq!(clock.advance(secs(90)), ts("2025-01-01T00:01:30Z"));
    assert_eq!(shared.now(), ts("2025-01-01T00:01:30Z"));
    assert_eq!(clock.advance(secs(-30)), ts("2025-01-01T00:01:00Z"));
    clock.set(ts("2030-05-05T05:05:05Z"));
    assert_eq!(shared.now(), ts("2030-05-05T05:05:05Z"));
    assert_eq!(clock.advance(SignedDuration::MAX), Timestamp::MAX);
    assert_eq!(clock.advance(SignedDuration::MIN), Timestamp::MIN);
    // Shared across threads, as controllers share their clock.
    let clock = std::sync::Arc::new(ManualClock::new(Timestamp::UNIX_EPOCH));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let clock = clock.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    clock.advance(secs(1));
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(clock.now(), Timestamp::from_second(400).unwrap());
}
