//! The machine-readable summary of `fhir-operator audit verify --summary`:
//! what a verification Job writes to its container's termination message
//! (`/dev/termination-log`) and the operator reads back, for a trail on a
//! PersistentVolumeClaim that only a pod can mount.
//!
//! It carries counts, times and names only: no key material and no record
//! content (verify's problem messages name a segment and a record by
//! number, never what the record says). Read back, it is hostile input: a
//! size bound, unknown fields refused, every string bounded and free of
//! control characters, and the result consistent with its fields.

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::verify::{Problem, Report};

/// Kubernetes keeps at most 4096 bytes of a termination message.
pub const MESSAGE_LIMIT: usize = 4096;
pub const VERSION: u32 = 1;
/// Longest stream or segment name kept.
const NAME_LIMIT: usize = 200;
/// Longest problem or error message kept.
const MESSAGE_TEXT_LIMIT: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// Every stream verified.
    Verified,
    /// The trail does not verify: `problem` names where.
    Broken,
    /// The trail could not be read: `error` says why.
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SummaryProblem {
    pub stream: String,
    pub checkpoint: u64,
    pub segment: String,
    pub seq: u64,
    pub message: String,
}

impl std::fmt::Display for SummaryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let problem = Problem {
            checkpoint: self.checkpoint,
            segment: self.segment.clone(),
            seq: self.seq,
            message: self.message.clone(),
        };
        write!(f, "stream {}: {problem}", self.stream)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Summary {
    pub version: u32,
    pub result: Outcome,
    pub streams: u64,
    pub checkpoints: u64,
    pub records: u64,
    /// The newest seal over every stream (RFC 3339).
    pub last_checkpoint: Option<String>,
    /// The first broken stream's first problem.
    pub problem: Option<SummaryProblem>,
    pub error: Option<String>,
}

/// Drops control characters and cuts to `limit` bytes on a character
/// boundary.
fn clean(text: &str, limit: usize) -> String {
    let mut out = String::new();
    for c in text.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > limit {
            break;
        }
        out.push(c);
    }
    out
}

impl Summary {
    pub fn from_report(report: &Report) -> Self {
        let problem = report.streams.iter().find_map(|s| {
            s.problem.as_ref().map(|p| SummaryProblem {
                stream: clean(&s.stream, NAME_LIMIT),
                checkpoint: p.checkpoint,
                segment: clean(&p.segment, NAME_LIMIT),
                seq: p.seq,
                message: clean(&p.message, MESSAGE_TEXT_LIMIT),
            })
        });
        let last_checkpoint =
            report.streams.iter().filter_map(|s| s.last_seal.parse::<Timestamp>().ok()).max().map(|t| t.to_string());
        let (result, error) = match (&problem, report.streams.is_empty()) {
            (Some(_), _) => (Outcome::Broken, None),
            (None, true) => {
                (Outcome::Error, Some(format!("{}: no audit stream found", clean(&report.destination, 200))))
            }
            (None, false) => (Outcome::Verified, None),
        };
        Summary {
            version: VERSION,
            result,
            streams: report.streams.len() as u64,
            checkpoints: report.streams.iter().map(|s| s.checkpoints).sum(),
            records: report.streams.iter().map(|s| s.records).sum(),
            last_checkpoint,
            problem,
            error,
        }
    }

    pub fn error(message: &str) -> Self {
        Summary {
            version: VERSION,
            result: Outcome::Error,
            streams: 0,
            checkpoints: 0,
            records: 0,
            last_checkpoint: None,
            problem: None,
            error: Some(clean(message, MESSAGE_TEXT_LIMIT)),
        }
    }

    /// JSON within [`MESSAGE_LIMIT`] (the bounds above keep it far below).
    pub fn to_message(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a termination message strictly: anything oversized, unknown,
    /// out of bounds or inconsistent is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MESSAGE_LIMIT {
            return Err(format!("the summary is {} bytes, more than {MESSAGE_LIMIT}", text.len()));
        }
        let summary: Summary =
            serde_json::from_str(text.trim()).map_err(|e| format!("the summary is not valid ({:?})", e.classify()))?;
        if summary.version != VERSION {
            return Err(format!("summary version {} is not {VERSION}", summary.version));
        }
        let bounded = |s: &str, limit: usize| s.len() <= limit && !s.chars().any(char::is_control);
        if let Some(p) = &summary.problem
            && !(bounded(&p.stream, NAME_LIMIT)
                && bounded(&p.segment, NAME_LIMIT)
                && bounded(&p.message, MESSAGE_TEXT_LIMIT))
        {
            return Err("the summary's problem has an oversized or control-character field".into());
        }
        if summary.error.as_deref().is_some_and(|e| !bounded(e, MESSAGE_TEXT_LIMIT)) {
            return Err("the summary's error is oversized or has control characters".into());
        }
        if let Some(at) = &summary.last_checkpoint
            && at.parse::<Timestamp>().is_err()
        {
            return Err("the summary's lastCheckpoint is not an RFC 3339 time".into());
        }
        let consistent = match summary.result {
            Outcome::Verified => {
                summary.problem.is_none()
                    && summary.error.is_none()
                    && summary.streams > 0
                    && summary.checkpoints > 0
                    && summary.last_checkpoint.is_some()
            }
            Outcome::Broken => summary.problem.is_some() && summary.error.is_none(),
            Outcome::Error => summary.problem.is_none() && summary.error.is_some(),
        };
        if !consistent {
            return Err(format!("the summary's fields contradict its result {:?}", summary.result));
        }
        Ok(summary)
    }

    pub fn last_checkpoint(&self) -> Option<Timestamp> {
        self.last_checkpoint.as_deref().and_then(|t| t.parse().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify::StreamReport;

    fn report(problem: Option<Problem>) -> Report {
        Report {
            destination: "dir /audit".into(),
            streams: vec![
                StreamReport {
                    stream: "patients-0".into(),
                    checkpoints: 3,
                    records: 40,
                    last_seal: "2026-01-01T00:10:00Z".into(),
                    ..Default::default()
                },
                StreamReport {
                    stream: "patients-1".into(),
                    checkpoints: 2,
                    records: 10,
                    last_seal: "2026-01-01T00:12:00Z".into(),
                    problem,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn a_verified_trail_round_trips() {
        let summary = Summary::from_report(&report(None));
        assert_eq!(summary.result, Outcome::Verified);
        assert_eq!((summary.streams, summary.checkpoints, summary.records), (2, 5, 50));
        assert_eq!(summary.last_checkpoint.as_deref(), Some("2026-01-01T00:12:00Z"));
        let message = summary.to_message();
        assert!(message.len() < 300, "{message}");
        assert_eq!(Summary::parse(&message), Ok(summary));
    }

    #[test]
    fn a_broken_trail_names_stream_segment_and_record() {
        let problem = Problem {
            checkpoint: 2,
            segment: "segments/2026-01-01T00:11:00Z-00000000000000000041.jsonl".into(),
            seq: 43,
            message: "record seq 43 was altered\n: record seq 44's prev hash does not match it".into(),
        };
        let summary = Summary::parse(&Summary::from_report(&report(Some(problem))).to_message()).unwrap();
        assert_eq!(summary.result, Outcome::Broken);
        let text = summary.problem.unwrap().to_string();
        assert_eq!(
            text,
            "stream patients-1: checkpoint 2, segment segments/2026-01-01T00:11:00Z-00000000000000000041.jsonl, \
             record seq 43: record seq 43 was altered: record seq 44's prev hash does not match it"
        );
    }

    #[test]
    fn long_fields_are_cut_to_fit_a_termination_message() {
        let problem = Problem { checkpoint: 1, segment: "s".repeat(5000), seq: 1, message: "é".repeat(5000) };
        let mut r = report(Some(problem));
        r.streams[1].stream = "x".repeat(5000);
        let message = Summary::from_report(&r).to_message();
        assert!(message.len() <= MESSAGE_LIMIT, "{}", message.len());
        assert!(Summary::parse(&message).is_ok());
        let error = Summary::error(&"y".repeat(10_000)).to_message();
        assert!(error.len() <= MESSAGE_LIMIT && Summary::parse(&error).is_ok());
        assert_eq!(Summary::from_report(&Report::default()).result, Outcome::Error);
    }

    #[test]
    fn hostile_messages_are_refused() {
        let good = Summary::from_report(&report(None)).to_message();
        let with = |from: &str, to: &str| good.replacen(from, to, 1);
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("not JSON", "the trail is fine, trust me".into()),
            ("logs in place of the summary", format!("{good}\nmore")),
            ("oversized", format!("{},\"pad\":\"{}\"}}", &good[..good.len() - 1], "a".repeat(5000))),
            ("an unknown field", with("\"version\"", "\"publicKey\":\"x\",\"version\"")),
            ("another version", with("\"version\":1", "\"version\":2")),
            ("an unknown result", with("\"verified\"", "\"pass\"")),
            ("a negative count", with("\"records\":50", "\"records\":-1")),
            ("a count beyond u64", with("\"records\":50", "\"records\":99999999999999999999999")),
            ("a time that is no time", with("2026-01-01T00:12:00Z", "yesterday")),
            (
                "verified without a checkpoint",
                with("\"lastCheckpoint\":\"2026-01-01T00:12:00Z\"", "\"lastCheckpoint\":null"),
            ),
            ("verified without streams", with("\"streams\":2", "\"streams\":0")),
            ("verified with an error", with("\"error\":null", "\"error\":\"x\"")),
            ("broken without a problem", with("\"verified\"", "\"broken\"")),
            ("a duplicate key", with("\"version\":1", "\"version\":1,\"version\":1")),
            ("a nested object in place of a count", with("\"records\":50", "\"records\":{\"a\":1}")),
        ];
        for (what, text) in cases {
            assert!(Summary::parse(&text).is_err(), "{what}: {text}");
        }
        let problem = Problem { checkpoint: 1, segment: "s".into(), seq: 1, message: "m".into() };
        let broken = Summary::from_report(&report(Some(problem))).to_message();
        assert!(Summary::parse(&broken.replacen("\"m\"", "\"a\\u0007b\"", 1)).is_err(), "control characters");
        assert!(Summary::parse(&broken.replacen("\"m\"", &format!("\"{}\"", "m".repeat(2000)), 1)).is_err());
        let error = Summary::error("unreadable").to_message();
        assert!(Summary::parse(&error.replacen("\"unreadable\"", "null", 1)).is_err(), "an error without a message");
    }
}
