//! What a backup leaves beside its encrypted dump (the manifest), and what
//! the agent reports back through its container's termination message.
//!
//! Nothing here holds key material: a manifest names the key schedule and
//! the version of its key, never the key.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Version of the manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
/// How the dump is encrypted: the age format with one scrypt recipient
/// whose passphrase is the base64 of the key version's 32 bytes.
pub const ENCRYPTION_FORMAT: &str = "age-scrypt";
pub const DUMP_SUFFIX: &str = ".dump.age";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Kubernetes keeps at most 4096 bytes of a termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// Written after the dump, so a manifest means a complete backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format_version: u32,
    /// The backup's id: the Job's name.
    pub backup: String,
    pub namespace: String,
    pub policy: String,
    pub endpoint: String,
    pub database: String,
    /// Object key (or file path below the destination root) of the dump.
    pub object: String,
    pub size_bytes: i64,
    /// SHA-256 of the encrypted dump, hex.
    pub sha256: String,
    pub encryption: Encryption,
    /// `pg_dump --format=custom`.
    pub dump_format: String,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// Rows per table in the dump (`schema.table` as pg_dump quotes it).
    pub tables: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    pub format: String,
    pub key_schedule: String,
    pub key_version: i64,
}

/// A backup agent's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupReport {
    pub location: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub key_version: i64,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    pub tables: usize,
    pub rows: u64,
    /// Backups retention removed after this one was written.
    #[serde(default)]
    pub pruned: Vec<String>,
}

/// A restore drill's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// The backup restored.
    pub backup: String,
    pub duration_seconds: f64,
    pub finished_at: Timestamp,
    pub tables: usize,
    pub rows: u64,
}

/// What the agent writes as its termination message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Report {
    Backup(BackupReport),
    Drill(DrillReport),
    /// A backup fetched and decrypted (the first step of a drill).
    Fetched {
        backup: String,
    },
    Failed {
        message: String,
    },
}

impl Report {
    /// JSON that fits a termination message: a long failure message is cut
    /// (on a character boundary); a success report never comes near it
    /// except with thousands of pruned backups, which are then left out.
    pub fn to_message(&self) -> String {
        let text = serde_json::to_string(self).unwrap_or_default();
        if text.len() <= TERMINATION_MESSAGE_LIMIT {
            return text;
        }
        match self {
            Report::Failed { message } => {
                let mut cut = message.clone();
                while serde_json::to_string(&Report::Failed { message: cut.clone() }).unwrap_or_default().len()
                    > TERMINATION_MESSAGE_LIMIT
                {
                    let keep = cut.char_indices().nth(cut.chars().count() * 3 / 4).map_or(0, |(i, _)| i);
                    cut.truncate(keep);
                }
                serde_json::to_string(&Report::Failed { message: cut }).unwrap_or_default()
            }
            Report::Backup(b) => {
                let mut b = b.clone();
                let count = b.pruned.len();
                b.pruned = vec![format!("{count} backups")];
                serde_json::to_string(&Report::Backup(b)).unwrap_or_default()
            }
            Report::Drill(_) | Report::Fetched { .. } => text,
        }
    }

    pub fn from_message(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text.trim())
    }
}

/// Reads the per-table row counts written by the dump script: one
/// `<rows>\t<table>` line per table.
pub fn parse_counts(text: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut tables = BTreeMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let (rows, table) = line.split_once('\t').ok_or_else(|| format!("line {}: no tab", n + 1))?;
        let rows: u64 = rows.trim().parse().map_err(|_| format!("line {}: {rows:?} is not a row count", n + 1))?;
        tables.insert(table.to_owned(), rows);
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_and_refuse_garbage() {
        let tables = parse_counts("3\tpublic.patient\n0\tpublic.\"Odd Name\"\n\n").unwrap();
        assert_eq!(tables["public.patient"], 3);
        assert_eq!(tables["public.\"Odd Name\""], 0);
        assert!(parse_counts("x\tpublic.a").unwrap_err().contains("line 1"));
        assert!(parse_counts("3 public.a").unwrap_err().contains("no tab"));
    }

    #[test]
    fn a_long_failure_is_cut_to_fit_a_termination_message() {
        let long = Report::Failed { message: "é".repeat(10_000) };
        let text = long.to_message();
        assert!(text.len() <= TERMINATION_MESSAGE_LIMIT, "{}", text.len());
        assert!(matches!(Report::from_message(&text).unwrap(), Report::Failed { message } if message.starts_with('é')));
    }

    #[test]
    fn reports_round_trip() {
        let report = Report::Drill(DrillReport {
            backup: "b".into(),
            duration_seconds: 1.5,
            finished_at: Timestamp::UNIX_EPOCH,
            tables: 2,
            rows: 7,
        });
        assert_eq!(Report::from_message(&report.to_message()).unwrap(), report);
    }
}
