//! `fhir-operator audit query`: the records that answer an auditor's
//! question (a client's or a patient's, within a time range), as JSON lines.

use chrono::{DateTime, Utc};

use super::checkpoint::SignedCheckpoint;
use super::record::{Record, parse_time};
use super::segment::lines;
use super::store::{AuditStore, StoreError};

/// Which records.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub client: Option<String>,
    pub patient: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub stream: Option<String>,
}

impl Filter {
    pub fn matches(&self, record: &Record) -> bool {
        let time = parse_time(&record.time);
        self.client.as_ref().is_none_or(|c| *c == record.client)
            && self.patient.as_ref().is_none_or(|p| *p == record.patient)
            && self.since.is_none_or(|since| time.is_some_and(|t| t >= since))
            && self.until.is_none_or(|until| time.is_some_and(|t| t < until))
    }

    /// Whether a segment with records from `first` to `last` may hold a match.
    fn overlaps(&self, first: &str, last: &str) -> bool {
        let (first, last) = (parse_time(first), parse_time(last));
        self.since.is_none_or(|since| last.is_none_or(|l| l >= since))
            && self.until.is_none_or(|until| first.is_none_or(|f| f < until))
    }
}

/// Calls `found` with every matching record, in stream and sequence order.
/// Reads only the segments whose checkpoints' time ranges overlap the
/// filter's. This does not verify: `audit verify` does.
pub async fn query(store: &AuditStore, filter: &Filter, mut found: impl FnMut(&Record)) -> Result<u64, StoreError> {
    let streams = match &filter.stream {
        Some(stream) => vec![stream.clone()],
        None => store.streams().await?,
    };
    let mut matched = 0;
    for stream in streams {
        for (_, bytes) in store.checkpoints(&stream).await? {
            let Ok(signed) = serde_json::from_slice::<SignedCheckpoint>(&bytes) else { continue };
            let cp = signed.checkpoint;
            if cp.count == 0 || !filter.overlaps(&cp.first_time, &cp.last_time) {
                continue;
            }
            let Some(segment) = store.get(&stream, &cp.segment).await? else { continue };
            for line in lines(&segment) {
                if let Ok(record) = serde_json::from_slice::<Record>(line)
                    && filter.matches(&record)
                {
                    matched += 1;
                    found(&record);
                }
            }
        }
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_client_patient_and_half_open_range() {
        let line = br#"{"time":"2025-03-07T09:05:01Z","client":"billing","method":"GET","path":"/fhir/Patient/p-1","status":200}"#;
        let record = Record::from_log_line(line, "");
        let at = |t: &str| parse_time(t);
        let filter = |client: Option<&str>, patient: Option<&str>, since, until| Filter {
            client: client.map(str::to_owned),
            patient: patient.map(str::to_owned),
            since,
            until,
            stream: None,
        };
        assert!(filter(Some("billing"), None, None, None).matches(&record));
        assert!(!filter(Some("portal"), None, None, None).matches(&record));
        assert!(filter(None, Some("p-1"), at("2025-03-07T09:05:01Z"), at("2025-03-07T09:05:02Z")).matches(&record));
        assert!(!filter(None, Some("p-1"), None, at("2025-03-07T09:05:01Z")).matches(&record));
        assert!(!filter(None, Some("p-2"), None, None).matches(&record));
        let f = filter(None, None, at("2025-03-08T00:00:00Z"), None);
        assert!(!f.overlaps("2025-03-07T00:00:00Z", "2025-03-07T23:59:59Z"));
        assert!(f.overlaps("2025-03-07T00:00:00Z", "2025-03-08T00:00:00Z"));
    }
}
