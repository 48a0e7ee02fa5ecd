//! Retention: how long the trail is kept, and which checkpoints (with their
//! segments) a pruning may remove. Pure; the caller passes the clock.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::checkpoint::{Checkpoint, Pruned};
use super::record::{format_time, parse_time};

/// The default retention: six years, HIPAA's documentation rule
/// (45 CFR 164.316(b)(2)).
pub const DEFAULT_RETENTION: &str = "6y";

/// Parses `6y`, `90d`, `2w`, `12h`, `30m`, `45s`, or sums such as `1y30d`.
/// A year counts 366 days and a month is not offered, so a retention is
/// never shorter than the calendar time asked. `None` for anything else,
/// zero, or overflow.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let seconds = crate::keyrotation::schedule::sum_of_units(text, |unit| match unit {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3_600),
        'd' => Some(86_400),
        'w' => Some(7 * 86_400),
        'y' => Some(366 * 86_400),
        _ => None,
    })?;
    Some(Duration::from_secs(seconds))
}

/// For clap.
pub fn duration_arg(text: &str) -> Result<Duration, String> {
    parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration such as 6y, 90d, 12h or 5m"))
}

/// When a checkpoint's content expires: the time of its last record, or
/// its seal for one without records.
fn expiry_base(checkpoint: &Checkpoint) -> Option<DateTime<Utc>> {
    let text = if checkpoint.count > 0 { &checkpoint.last_time } else { &checkpoint.period_end };
    parse_time(text)
}

/// The pruning after which everything expired is gone: the oldest
/// checkpoints, in index order (`checkpoints` sorted by index, the newest
/// present ones, starting right after `already`), as long as each one's
/// content is older than `now - retention`. Only a run from the oldest
/// onward is pruned, never one in the middle. `None` when nothing more
/// expired.
pub fn plan(
    checkpoints: &[Checkpoint],
    already: Option<&Pruned>,
    retention: Duration,
    now: DateTime<Utc>,
) -> Option<Pruned> {
    let cutoff = now - chrono::Duration::from_std(retention).ok()?;
    let first = already.map_or(1, |p| p.through_index + 1);
    let mut last: Option<&Checkpoint> = None;
    let candidates = checkpoints.iter().filter(|c| c.index >= first);
    for (next, checkpoint) in (first..).zip(candidates) {
        if checkpoint.index != next || expiry_base(checkpoint).is_none_or(|t| t >= cutoff) {
            break;
        }
        last = Some(checkpoint);
    }
    let last = last?;
    Some(Pruned {
        through_index: last.index,
        checkpoint_hash: last.hash(),
        through_seq: last.last_seq,
        head: last.head.clone(),
        before: format_time(cutoff),
        at: format_time(now),
    })
}

#[cfg(test)]
mod tests {
    use super::super::chain::GENESIS;
    use super::super::checkpoint::VERSION;
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("6y"), Some(Duration::from_secs(6 * 366 * 86_400)));
        assert_eq!(parse_duration("90d"), Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("12h"), Some(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5_400)));
        for bad in ["", "6", "y", "0d", "6 y", "6mo", "-1d", "99999999999999999999y"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    fn checkpoint(index: u64, count: u64, last_time: &str, period_end: &str) -> Checkpoint {
        Checkpoint {
            version: VERSION,
            stream: "s".into(),
            index,
            prev_checkpoint: GENESIS.into(),
            segment: String::new(),
            segment_sha256: String::new(),
            first_seq: index * 10,
            last_seq: index * 10 + count - 1,
            count,
            first_time: last_time.into(),
            last_time: last_time.into(),
            head: format!("head{index}"),
            period_start: String::new(),
            period_end: period_end.into(),
            pruned: None,
            source_reset: String::new(),
            key_id: "k".into(),
        }
    }

    #[test]
    fn prunes_exactly_the_expired_run_from_the_oldest() {
        let now = parse_time("2031-01-10T00:00:00Z").expect("time");
        let checkpoints = vec![
            checkpoint(1, 5, "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"),
            checkpoint(2, 0, "", "2025-01-04T00:00:00Z"),
            checkpoint(3, 5, "2025-01-05T00:00:01Z", "2025-01-05T00:05:00Z"),
            // Its last record is younger than six years: it stays, and so
            // does everything after it, expired or not.
            checkpoint(4, 5, "2025-01-20T00:00:00Z", "2025-01-20T00:05:00Z"),
            checkpoint(5, 5, "2025-01-01T00:00:00Z", "2025-01-01T00:05:00Z"),
        ];
        let six_years = parse_duration("6y").expect("duration");
        // 2031-01-10 minus 6 x 366 days is 2025-01-05: five days before the
        // calendar date six years back (one of those years was a leap year).
        let pruned = plan(&checkpoints, None, six_years, now).expect("prunes");
        assert_eq!((pruned.through_index, pruned.through_seq, pruned.head.as_str()), (2, 19, "head2"));
        assert_eq!(pruned.checkpoint_hash, checkpoints[1].hash());
        assert_eq!(pruned.before, "2025-01-05T00:00:00Z");
        let later = parse_time("2031-01-17T00:00:00Z").expect("time");
        let more = plan(&checkpoints[2..], Some(&pruned), six_years, later).expect("prunes more");
        assert_eq!(more.through_index, 3);
        assert_eq!(plan(&checkpoints[3..], Some(&more), six_years, later), None);
        // A gap (checkpoint 2 missing) stops the run.
        let gap = [checkpoints[0].clone(), checkpoints[2].clone()];
        assert_eq!(plan(&gap, None, six_years, later).map(|p| p.through_index), Some(1));
    }
}
