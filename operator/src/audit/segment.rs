//! Segments: the records sealed together, as JSON lines, and what their
//! checkpoint says about them.

use super::chain::{Chain, sha256_hex};
use super::record::Record;

/// Records read since the last seal, chained, waiting to be sealed.
#[derive(Debug, Clone, Default)]
pub struct Pending {
    /// The segment's bytes: one canonical record per line, each ending in `\n`.
    pub bytes: Vec<u8>,
    pub first_seq: u64,
    pub count: u64,
    pub first_time: String,
    pub last_time: String,
}

impl Pending {
    pub fn new(first_seq: u64) -> Self {
        Pending { first_seq, ..Pending::default() }
    }

    /// Chains `record` and appends it.
    pub fn push(&mut self, chain: &mut Chain, record: Record) {
        if self.count == 0 {
            self.first_time = record.time.clone();
        }
        self.last_time = record.time.clone();
        let line = chain.link(record);
        self.bytes.extend_from_slice(&line);
        self.bytes.push(b'\n');
        self.count += 1;
    }

    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.count - 1
    }

    pub fn sha256(&self) -> String {
        sha256_hex(&self.bytes)
    }

    /// The object name under the stream, `segments/<first time>-<first seq>.jsonl`
    /// (`20250307T090501Z-00000000000000000001.jsonl`): listed in time order.
    pub fn name(&self) -> String {
        segment_name(&self.first_time, self.first_seq)
    }
}

pub const SEGMENTS_DIR: &str = "segments";

pub fn segment_name(first_time: &str, first_seq: u64) -> String {
    let compact: String = first_time.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("{SEGMENTS_DIR}/{compact}-{first_seq:020}.jsonl")
}

/// Splits a segment into its lines (without the `\n`); a last line without
/// a newline is returned too, so that a cut segment shows.
pub fn lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_is_named_by_its_first_record() {
        let mut chain = Chain::default();
        let mut pending = Pending::new(chain.next_seq);
        for _ in 0..3 {
            pending.push(&mut chain, Record::from_log_line(b"x", "2025-03-07T09:05:01Z"));
        }
        assert_eq!((pending.first_seq, pending.last_seq(), pending.count), (1, 3, 3));
        assert_eq!(pending.name(), "segments/20250307T090501Z-00000000000000000001.jsonl");
        assert_eq!(lines(&pending.bytes).len(), 3);
        assert_eq!(lines(b"a\nb"), vec![&b"a"[..], b"b"]);
    }
}
