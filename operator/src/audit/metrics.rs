//! The sidecar's own metrics, beside the gateway's: the trail's health and
//! the distinct patients each client touched in a sliding window (for the
//! "many patients" anomaly alert). No label carries a patient id, a path or
//! an address: the only label is the client id, bounded by the key map.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Records chained into the trail.
pub const RECORDS_TOTAL: &str = "fhir_audit_records_total";
/// Checkpoints written.
pub const SEALS_TOTAL: &str = "fhir_audit_seals_total";
/// Failed attempts to write a segment or checkpoint (retried).
pub const SEAL_ERRORS_TOTAL: &str = "fhir_audit_seal_errors_total";
/// Unix seconds of the last checkpoint written; 0 before the first.
pub const LAST_SEAL_TIMESTAMP_SECONDS: &str = "fhir_audit_last_seal_timestamp_seconds";
/// Times the access log was found replaced or truncated, or the state lost.
pub const SOURCE_RESETS_TOTAL: &str = "fhir_audit_source_resets_total";
/// Distinct patients (`Patient/<id>` in the URL) each client touched in
/// the window (`--patients-window`). Label: `client`.
pub const CLIENT_DISTINCT_PATIENTS: &str = "fhir_gateway_client_distinct_patients";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

/// Distinct patients per client within a sliding window of `window`
/// seconds, by the records' own times. Patient ids are kept only as keyed
/// 64-bit hashes (a per-process random key). Pure apart from that key.
#[derive(Debug)]
pub struct DistinctPatients {
    window: i64,
    hasher: std::collections::hash_map::RandomState,
    /// client -> patient hash -> last seen (Unix seconds).
    clients: HashMap<String, HashMap<u64, i64>>,
}

impl DistinctPatients {
    pub fn new(window_seconds: i64) -> Self {
        DistinctPatients { window: window_seconds, hasher: Default::default(), clients: HashMap::new() }
    }

    /// Notes an access and returns the client's count in the window ending at `at`.
    pub fn observe(&mut self, client: &str, patient: &str, at: i64) -> usize {
        let key = self.hasher.hash_one(patient);
        let window = self.window;
        let seen = self.clients.entry(client.to_owned()).or_default();
        let last = seen.entry(key).or_insert(at);
        *last = (*last).max(at);
        seen.retain(|_, t| *t > at - window);
        seen.len()
    }

    /// Drops what left the window ending at `now`; every client's count
    /// (clients at 0 are forgotten after this call).
    pub fn sweep(&mut self, now: i64) -> Vec<(String, usize)> {
        let window = self.window;
        let counts = self
            .clients
            .iter_mut()
            .map(|(client, seen)| {
                seen.retain(|_, t| *t > now - window);
                (client.clone(), seen.len())
            })
            .collect();
        self.clients.retain(|_, seen| !seen.is_empty());
        counts
    }
}

#[derive(Debug)]
pub struct AuditMetrics {
    pub records: Counter,
    pub seals: Counter,
    pub seal_errors: Counter,
    pub last_seal: Gauge,
    pub source_resets: Counter,
    distinct: Family<ClientLabel, Gauge>,
    patients: Mutex<DistinctPatients>,
}

impl AuditMetrics {
    /// Registers everything into `registry` (the gateway metrics' own).
    pub fn new(registry: &mut Registry, patients_window_seconds: i64) -> Self {
        let metrics = AuditMetrics {
            records: Counter::default(),
            seals: Counter::default(),
            seal_errors: Counter::default(),
            last_seal: Gauge::default(),
            source_resets: Counter::default(),
            distinct: Family::default(),
            patients: Mutex::new(DistinctPatients::new(patients_window_seconds)),
        };
        let base = |name: &'static str| name.strip_suffix("_total").unwrap_or(name);
        registry.register(base(RECORDS_TOTAL), "Records chained into the audit trail", metrics.records.clone());
        registry.register(base(SEALS_TOTAL), "Audit checkpoints written", metrics.seals.clone());
        registry.register(
            base(SEAL_ERRORS_TOTAL),
            "Failed attempts to write an audit segment or checkpoint",
            metrics.seal_errors.clone(),
        );
        registry.register(
            LAST_SEAL_TIMESTAMP_SECONDS,
            "Unix seconds of the last audit checkpoint written (0: none yet)",
            metrics.last_seal.clone(),
        );
        registry.register(
            base(SOURCE_RESETS_TOTAL),
            "Times the access log's continuity could not be vouched for",
            metrics.source_resets.clone(),
        );
        registry.register(
            CLIENT_DISTINCT_PATIENTS,
            "Distinct patients each client touched in the sliding window",
            metrics.distinct.clone(),
        );
        metrics
    }

    pub fn observe_patient(&self, client: &str, patient: &str, at: i64) {
        let count = match self.patients.lock() {
            Ok(mut patients) => patients.observe(client, patient, at),
            Err(_) => return,
        };
        self.distinct.get_or_create(&ClientLabel { client: client.to_owned() }).set(count as i64);
    }

    /// Moves the window to `now` for every client.
    pub fn sweep_patients(&self, now: i64) {
        let counts = match self.patients.lock() {
            Ok(mut patients) => patients.sweep(now),
            Err(_) => return,
        };
        for (client, count) in counts {
            let label = ClientLabel { client };
            if count == 0 {
                self.distinct.remove(&label);
            } else {
                self.distinct.get_or_create(&label).set(count as i64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_distinct_patients_in_the_window() {
        let mut patients = DistinctPatients::new(3600);
        assert_eq!(patients.observe("billing", "p1", 0), 1);
        assert_eq!(patients.observe("billing", "p1", 10), 1);
        assert_eq!(patients.observe("billing", "p2", 20), 2);
        assert_eq!(patients.observe("portal", "p1", 20), 1);
        // p1 was last seen at 10 and p2 at 20: at 3615 only p2 is in the window.
        assert_eq!(patients.observe("billing", "p3", 3615), 2);
        let mut counts = patients.sweep(7300);
        counts.sort();
        assert_eq!(counts, vec![("billing".into(), 0), ("portal".into(), 0)]);
        assert!(patients.sweep(7300).is_empty());
    }

    #[test]
    fn no_patient_id_in_the_exposition() {
        let mut registry = Registry::default();
        let metrics = AuditMetrics::new(&mut registry, 3600);
        metrics.observe_patient("billing", "patient-secret-42", 100);
        metrics.observe_patient("billing", "patient-other", 100);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains(&format!("{CLIENT_DISTINCT_PATIENTS}{{client=\"billing\"}} 2")), "{text}");
        assert!(!text.contains("patient-secret-42"));
        metrics.sweep_patients(10_000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(!text.contains("client=\"billing\""), "{text}");
    }
}
