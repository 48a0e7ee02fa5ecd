//! `fhir-operator audit verify`: checks a destination's trail end to end.
//!
//! For each stream, in checkpoint order: every checkpoint's signature with
//! the public key, its index and its link to the previous checkpoint, that
//! consecutive checkpoints' periods meet (a gap in time) and their records
//! follow on (a gap in sequence), each segment's records one by one (their
//! numbers, their `prev` hashes, their canonical form, their times), its
//! count, chain head and SHA-256 against the checkpoint. What retention
//! pruned is accepted only as the newest checkpoint's signed `pruned` says,
//! and only from the oldest on. The first problem of a stream names the
//! segment and the record where the trail stops being provable.

use chrono::{DateTime, Utc};
use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::chain::{GENESIS, sha256_hex};
use super::checkpoint::{Checkpoint, Pruned, SignedCheckpoint};
use super::record::{Record, parse_time};
use super::segment::{SEGMENTS_DIR, lines};
use super::store::{AuditStore, StoreError};

/// How far record times may run backwards (nginx logs whole seconds, and
/// several workers may finish out of order within one).
const TIME_SLACK_SECONDS: i64 = 2;

/// Where a stream's trail stops being provable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub checkpoint: u64,
    /// The segment object (under the stream), or empty for a checkpoint
    /// without one.
    pub segment: String,
    /// The first record that cannot be vouched for.
    pub seq: u64,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let segment = if self.segment.is_empty() { "(no segment)" } else { &self.segment };
        write!(f, "checkpoint {}, segment {segment}, record seq {}: {}", self.checkpoint, self.seq, self.message)
    }
}

/// What was checked in one stream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    pub stream: String,
    pub checkpoints: u64,
    pub signatures: u64,
    pub segments: u64,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time: String,
    pub last_time: String,
    pub last_seal: String,
    /// Longest time between two seals, seconds.
    pub longest_period_seconds: i64,
    pub pruned: Option<Pruned>,
    /// Objects pruning covers that are still there (deleted next).
    pub awaiting_deletion: u64,
    /// Segments after the last checkpoint (a seal in progress).
    pub unsealed: Vec<String>,
    /// Checkpoints whose sidecar could not vouch for the log before them.
    pub source_resets: Vec<String>,
    pub problem: Option<Problem>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub destination: String,
    pub streams: Vec<StreamReport>,
}

impl Report {
    pub fn ok(&self) -> bool {
        !self.streams.is_empty() && self.streams.iter().all(|s| s.problem.is_none())
    }
}

/// Verifies every stream of the destination (or only `only`).
pub async fn verify(store: &AuditStore, key: &VerifyingKey, only: Option<&str>) -> Result<Report, StoreError> {
    let mut report = Report { destination: store.describe().to_owned(), streams: Vec::new() };
    let streams = match only {
        Some(stream) => vec![stream.to_owned()],
        None => store.streams().await?,
    };
    for stream in streams {
        report.streams.push(verify_stream(store, key, &stream).await?);
    }
    Ok(report)
}

/// What the next checkpoint must continue from.
struct Expect {
    index: u64,
    prev_checkpoint: String,
    seq: u64,
    head: String,
    period_start: Option<String>,
    last_time: Option<DateTime<Utc>>,
}

async fn verify_stream(store: &AuditStore, key: &VerifyingKey, stream: &str) -> Result<StreamReport, StoreError> {
    let mut report = StreamReport { stream: stream.to_owned(), ..StreamReport::default() };
    let names = store.list(stream).await?;
    let mut parsed: Vec<(u64, Result<SignedCheckpoint, String>)> = Vec::new();
    for (index, bytes) in store.checkpoints(stream).await? {
        parsed.push((index, serde_json::from_slice::<SignedCheckpoint>(&bytes).map_err(|e| e.to_string())));
    }
    // The newest checkpoint that verifies says what was pruned.
    let pruned = parsed
        .iter()
        .rev()
        .filter_map(|(_, c)| c.as_ref().ok())
        .find(|c| c.verify(key))
        .and_then(|c| c.checkpoint.pruned.clone());
    let mut expect = match &pruned {
        Some(p) => Expect {
            index: p.through_index + 1,
            prev_checkpoint: p.checkpoint_hash.clone(),
            seq: p.through_seq + 1,
            head: p.head.clone(),
            period_start: None,
            last_time: None,
        },
        None => Expect {
            index: 1,
            prev_checkpoint: GENESIS.to_owned(),
            seq: 1,
            head: GENESIS.to_owned(),
            period_start: None,
            last_time: None,
        },
    };
    report.pruned = pruned;
    report.first_seq = expect.seq;
    let mut referenced: Vec<String> = Vec::new();
    for (index, checkpoint) in parsed {
        if index < expect.index {
            report.awaiting_deletion += 1;
            continue;
        }
        let problem = |segment: &str, seq: u64, message: String| Problem {
            checkpoint: index,
            segment: segment.to_owned(),
            seq,
            message,
        };
        let signed = match checkpoint {
            Ok(signed) => signed,
            Err(e) => {
                report.problem = Some(problem("", expect.seq, format!("the checkpoint does not parse: {e}")));
                return Ok(report);
            }
        };
        let cp = &signed.checkpoint;
        if index != expect.index {
            let message = format!(
                "checkpoint {} is missing (records from seq {} up to the segment of checkpoint {index}, seq {}, \
                 cannot be vouched for)",
                expect.index, expect.seq, cp.first_seq
            );
            report.problem = Some(problem(&cp.segment, expect.seq, message));
            return Ok(report);
        }
        if let Some(message) = check_checkpoint(cp, &signed, key, stream, &expect) {
            report.problem = Some(problem(&cp.segment, cp.first_seq.min(expect.seq), message));
            return Ok(report);
        }
        report.signatures += 1;
        if cp.count > 0 {
            referenced.push(cp.segment.clone());
            let Some(bytes) = store.get(stream, &cp.segment).await? else {
                let message = format!("the segment is missing (records seq {}..={})", cp.first_seq, cp.last_seq);
                report.problem = Some(problem(&cp.segment, cp.first_seq, message));
                return Ok(report);
            };
            if let Err((seq, message)) = check_segment(cp, &bytes, &mut expect) {
                report.problem = Some(problem(&cp.segment, seq, message));
                return Ok(report);
            }
            report.segments += 1;
            report.records += cp.count;
            if report.first_time.is_empty() {
                report.first_time = cp.first_time.clone();
            }
            report.last_time = cp.last_time.clone();
        }
        if !cp.source_reset.is_empty() {
            report.source_resets.push(format!("checkpoint {index}: {}", cp.source_reset));
        }
        if let (Some(start), Some(end)) = (parse_time(&cp.period_start), parse_time(&cp.period_end)) {
            report.longest_period_seconds = report.longest_period_seconds.max((end - start).num_seconds());
        }
        report.checkpoints += 1;
        report.last_seq = cp.last_seq;
        report.last_seal = cp.period_end.clone();
        expect.index += 1;
        expect.prev_checkpoint = cp.hash();
        expect.seq = cp.last_seq + 1;
        expect.head = cp.head.clone();
        expect.period_start = Some(cp.period_end.clone());
    }
    let newest_seq = expect.seq;
    for name in names.iter().filter(|n| n.starts_with(SEGMENTS_DIR) && !referenced.contains(n)) {
        match first_seq_of(name) {
            Some(seq) if seq >= newest_seq => report.unsealed.push(name.clone()),
            Some(seq) if report.pruned.as_ref().is_some_and(|p| seq <= p.through_seq) => report.awaiting_deletion += 1,
            _ => {
                report.problem = Some(Problem {
                    checkpoint: 0,
                    segment: name.clone(),
                    seq: first_seq_of(name).unwrap_or(0),
                    message: "no checkpoint names this segment".into(),
                });
                return Ok(report);
            }
        }
    }
    if report.checkpoints == 0 && report.pruned.is_none() {
        report.problem = Some(Problem {
            checkpoint: 1,
            segment: String::new(),
            seq: 1,
            message: "the stream has no checkpoint".into(),
        });
    }
    Ok(report)
}

/// `segments/<time>-<seq>.jsonl` -> seq.
fn first_seq_of(name: &str) -> Option<u64> {
    name.strip_suffix(".jsonl")?.rsplit('-').next()?.parse().ok()
}

/// The checkpoint itself: signature, identity, links and ranges.
fn check_checkpoint(
    cp: &Checkpoint,
    signed: &SignedCheckpoint,
    key: &VerifyingKey,
    stream: &str,
    expect: &Expect,
) -> Option<String> {
    if !signed.verify(key) {
        return Some(format!(
            "the checkpoint's signature does not verify with the public key (records seq {}..={} unproven)",
            cp.first_seq, cp.last_seq
        ));
    }
    if cp.index != expect.index || cp.stream != stream {
        return Some(format!(
            "the checkpoint says it is checkpoint {} of stream {:?}: moved from elsewhere",
            cp.index, cp.stream
        ));
    }
    if cp.prev_checkpoint != expect.prev_checkpoint {
        return Some("the link to the previous checkpoint is broken (a checkpoint was replaced or removed)".into());
    }
    if cp.first_seq != expect.seq {
        return Some(format!(
            "the sequence has a gap: expected seq {}, the checkpoint starts at {}",
            expect.seq, cp.first_seq
        ));
    }
    if cp.last_seq + 1 != cp.first_seq + cp.count {
        return Some(format!(
            "the checkpoint's range {}..={} does not hold {} records",
            cp.first_seq, cp.last_seq, cp.count
        ));
    }
    if let Some(start) = &expect.period_start
        && cp.period_start != *start
    {
        return Some(format!("a gap in time: this period starts {}, the previous one ended {start}", cp.period_start));
    }
    if cp.count == 0 && cp.head != expect.head {
        return Some("an empty checkpoint changed the chain head".into());
    }
    None
}

/// The records of a segment, against its checkpoint; updates `expect`'s
/// head and last time. An error names the first record that fails.
fn check_segment(cp: &Checkpoint, bytes: &[u8], expect: &mut Expect) -> Result<(), (u64, String)> {
    let slack = chrono::Duration::seconds(TIME_SLACK_SECONDS);
    let period_end = parse_time(&cp.period_end);
    let lines = lines(bytes);
    for (i, line) in lines.iter().enumerate() {
        let seq = cp.first_seq + i as u64;
        // serde's message may quote the line's values: only its kind and
        // column are said (a record's content can be PHI).
        let record: Record = serde_json::from_slice(line).map_err(|e| {
            (
                seq,
                format!("the line is not an audit record ({:?} error at column {}): altered", e.classify(), e.column()),
            )
        })?;
        if record.seq != seq {
            let how = if record.seq > seq {
                format!("record seq {seq} is missing (found seq {} in its place)", record.seq)
            } else {
                format!("found seq {} where seq {seq} belongs (records reordered, swapped or repeated)", record.seq)
            };
            return Err((seq, how));
        }
        if record.prev != expect.head {
            let altered = seq.saturating_sub(1).max(cp.first_seq.min(seq));
            let message = if seq == cp.first_seq {
                "its prev hash does not match the previous segment's chain head (segments swapped, replaced or \
                 altered)"
                    .to_owned()
            } else {
                format!("record seq {} was altered: record seq {seq}'s prev hash does not match it", seq - 1)
            };
            return Err((altered, message));
        }
        if serde_json::to_vec(&record).ok().as_deref() != Some(*line) {
            return Err((seq, "the record is not in canonical form: altered".into()));
        }
        let time = parse_time(&record.time).ok_or((seq, "its time is not RFC 3339: altered".to_owned()))?;
        if let Some(last) = expect.last_time
            && time + slack < last
        {
            return Err((seq, format!("time {} runs backwards (the record before is {last})", record.time)));
        }
        if let Some(end) = period_end
            && time > end + slack
        {
            return Err((seq, format!("time {} is after its checkpoint was sealed ({})", record.time, cp.period_end)));
        }
        expect.last_time = Some(time);
        expect.head = sha256_hex(line);
    }
    let last = cp.first_seq + lines.len() as u64 - 1;
    if (lines.len() as u64) < cp.count {
        return Err((last + 1, format!("record seq {} is missing: the segment ends early", last + 1)));
    }
    if lines.len() as u64 > cp.count {
        return Err((cp.last_seq + 1, "the segment holds records its checkpoint does not".into()));
    }
    if expect.head != cp.head {
        return Err((
            cp.last_seq,
            format!("record seq {} was altered: it does not hash to the signed chain head", cp.last_seq),
        ));
    }
    if sha256_hex(bytes) != cp.segment_sha256 {
        return Err((cp.last_seq, "the segment's SHA-256 does not match its checkpoint".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::chain::Chain;
    use super::super::checkpoint::VERSION;
    use super::super::segment::Pending;
    use super::*;

    /// Five chained records (seq 1..=5) and the checkpoint that seals them.
    fn sealed() -> (Vec<u8>, Checkpoint) {
        let mut chain = Chain::default();
        let mut pending = Pending::new(1);
        for i in 0..5 {
            let line = format!(
                r#"{{"time":"2026-01-01T00:00:0{i}Z","client":"billing","method":"GET","path":"/fhir/Patient/p{i}","status":200}}"#
            );
            pending.push(&mut chain, Record::from_log_line(line.as_bytes(), ""));
        }
        let checkpoint = Checkpoint {
            version: VERSION,
            stream: "s".into(),
            index: 1,
            prev_checkpoint: GENESIS.into(),
            segment: pending.name(),
            segment_sha256: pending.sha256(),
            first_seq: 1,
            last_seq: 5,
            count: 5,
            first_time: pending.first_time.clone(),
            last_time: pending.last_time.clone(),
            head: chain.head.clone(),
            period_start: "2025-12-31T23:59:00Z".into(),
            period_end: "2026-01-01T00:00:10Z".into(),
            pruned: None,
            source_reset: String::new(),
            key_id: "k".into(),
        };
        (pending.bytes, checkpoint)
    }

    fn check(bytes: &[u8], checkpoint: &Checkpoint) -> Result<(), (u64, String)> {
        let mut expect = Expect {
            index: 1,
            prev_checkpoint: GENESIS.into(),
            seq: 1,
            head: GENESIS.into(),
            period_start: None,
            last_time: None,
        };
        check_segment(checkpoint, bytes, &mut expect)
    }

    fn edit(bytes: &[u8], f: impl FnOnce(&mut Vec<String>)) -> Vec<u8> {
        let mut lines: Vec<String> = String::from_utf8_lossy(bytes).lines().map(str::to_owned).collect();
        f(&mut lines);
        (lines.join("\n") + "\n").into_bytes()
    }

    #[test]
    fn an_intact_segment_passes() {
        let (bytes, checkpoint) = sealed();
        assert_eq!(check(&bytes, &checkpoint), Ok(()));
    }

    #[test]
    fn each_change_names_its_record() {
        let (bytes, checkpoint) = sealed();
        let cases: Vec<(&str, Vec<u8>, u64)> = vec![
            ("an edited value", edit(&bytes, |l| l[2] = l[2].replace("\"outcome\":200", "\"outcome\":201")), 3),
            ("an edited last record", edit(&bytes, |l| l[4] = l[4].replace("p4", "p9")), 5),
            ("a deleted record", edit(&bytes, |l| drop(l.remove(1))), 2),
            ("a deleted last record", edit(&bytes, |l| drop(l.pop())), 5),
            ("two records swapped", edit(&bytes, |l| l.swap(1, 3)), 2),
            ("a repeated record", edit(&bytes, |l| l.insert(2, l[1].clone())), 3),
            ("a line that is no record", edit(&bytes, |l| l[3] = "{}".into()), 4),
            ("a record in another form", edit(&bytes, |l| l[3] = l[3].replace(",", ", ")), 4),
        ];
        for (what, tampered, seq) in cases {
            let result = check(&tampered, &checkpoint);
            assert_eq!(result.as_ref().map_err(|e| e.0), Err(seq), "{what}: {result:?}");
        }
        let mut late = checkpoint.clone();
        late.period_end = "2026-01-01T00:00:01Z".into();
        assert_eq!(check(&bytes, &late).map_err(|e| e.0), Err(5), "a record sealed before it was written (2 s slack)");
        let mut other = checkpoint;
        other.segment_sha256 = "0".repeat(64);
        assert!(check(&bytes, &other).is_err_and(|e| e.1.contains("SHA-256")));
    }
}
