//! The hash chain: every record carries its sequence number and the
//! SHA-256 of the previous record's bytes, so that editing, removing,
//! inserting or reordering a record breaks the link after it (or, for the
//! newest, the chain head its checkpoint signs).

use sha2::{Digest, Sha256};

use super::record::Record;

/// `prev` of a stream's first record, and the head of an empty stream.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where a chain stands: the next record's number and the last one's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub next_seq: u64,
    pub head: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain { next_seq: 1, head: GENESIS.to_owned() }
    }
}

impl Chain {
    /// Links `record` into the chain and returns its canonical line (the
    /// JSON without a newline): the bytes the next record's `prev` hashes.
    pub fn link(&mut self, mut record: Record) -> Vec<u8> {
        record.seq = self.next_seq;
        record.prev = std::mem::take(&mut self.head);
        // A struct of strings and numbers always serializes.
        let line = serde_json::to_vec(&record).unwrap_or_default();
        self.head = sha256_hex(&line);
        self.next_seq += 1;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_record_names_the_hash_of_the_one_before() {
        let mut chain = Chain::default();
        let record = Record::from_log_line(b"x", "2025-01-01T00:00:00Z");
        let first = chain.link(record.clone());
        let second = chain.link(record);
        let a: Record = serde_json::from_slice(&first).expect("parses");
        let b: Record = serde_json::from_slice(&second).expect("parses");
        assert_eq!((a.seq, a.prev.as_str()), (1, GENESIS));
        assert_eq!((b.seq, b.prev.clone()), (2, sha256_hex(&first)));
        assert_eq!(chain, Chain { next_seq: 3, head: sha256_hex(&second) });
        assert_eq!(serde_json::to_vec(&b).expect("encodes"), second, "the line is canonical");
    }
}
