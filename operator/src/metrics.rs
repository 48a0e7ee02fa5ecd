//! The operator's own Prometheus metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    /// A fixed category (`api`, `tls`, ...), never a message: messages can
    /// carry names without bound.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub controller: &'static str,
    pub kind: String,
    /// `missing`, `changed`, `drifted` or `unknown`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// A key rotation step, as its event reason (`RotationStarted`, ...).
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    /// Not `namespace` and `endpoint`: Prometheus's target labels of the
    /// operator's own scrape would overwrite those.
    pub policy_namespace: String,
    pub policy: String,
    pub fhir_endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// `backup` or `restore-drill`.
    pub kind: &'static str,
    /// `started`, `succeeded`, `failed` or `skipped`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub controller: &'static str,
    pub kind: String,
    /// The watched namespace, empty for all namespaces.
    pub scope: String,
}

type SecondsGauge = Family<BackupLabels, Gauge<f64, AtomicU64>>;

/// Every metric of the operator, registered once.
pub struct Metrics {
    pub registry: Registry,
    pub reconciliations: Family<ControllerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub invalid_specs: Family<ControllerLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub writes: Family<WriteLabels, Counter>,
    pub steps: Family<StepLabels, Counter>,
    /// 1 while this process holds the leader lease (or runs without leader
    /// election), 0 otherwise.
    pub leader: Gauge,
    pub backup_runs: Family<RunLabels, Counter>,
    /// Unix time of each policy's last successful backup.
    pub backup_last_success: SecondsGauge,
    /// Unix time of each policy's last verified restore.
    pub restore_last_verified: SecondsGauge,
    /// How old the last successful backup may be: twice the interval.
    pub backup_max_age: SecondsGauge,
    /// How old the last verified restore may be: the drill interval plus slack.
    pub restore_max_age: SecondsGauge,
    /// Unix time of each watch's last sign of life (a list, an event, or
    /// the API server answering its watch request).
    pub watch_last_alive: Family<WatchLabels, Gauge<f64, AtomicU64>>,
    /// 1 while the watch's cache is complete (listed, no error since).
    pub watch_synced: Family<WatchLabels, Gauge>,
    /// Restarts of each watch: fresh lists after the first.
    pub watch_restarts: Family<WatchLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("fhir_operator");
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let invalid_specs = Family::<ControllerLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let writes = Family::<WriteLabels, Counter>::default();
        registry.register("reconciliations", "Reconciliations run", reconciliations.clone());
        registry.register("reconcile_errors", "Reconciliations that failed, by category", errors.clone());
        registry.register("invalid_specs", "Reconciliations that found an invalid spec", invalid_specs.clone());
        registry.register("reconcile_duration_seconds", "Time spent in one reconciliation", duration.clone());
        registry.register(
            "child_writes",
            "Children written, by kind and why (drift corrections included)",
            writes.clone(),
        );
        let steps = Family::<StepLabels, Counter>::default();
        registry.register("key_rotation_steps", "Key rotation steps taken, by step (the event reason)", steps.clone());
        let leader = Gauge::default();
        registry.register("leader", "1 while this process leads and runs the controllers", leader.clone());
        let backup_runs = Family::<RunLabels, Counter>::default();
        registry.register("backup_runs", "Backup and restore drill runs, by kind and outcome", backup_runs.clone());
        let backup_last_success = SecondsGauge::default();
        registry.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the policy's last successful backup",
            backup_last_success.clone(),
        );
        let restore_last_verified = SecondsGauge::default();
        registry.register(
            "restore_last_verified_timestamp_seconds",
            "Unix time of the policy's last verified restore drill",
            restore_last_verified.clone(),
        );
        let backup_max_age = SecondsGauge::default();
        registry.register(
            "backup_max_age_seconds",
            "How old the last successful backup may get (twice the schedule interval)",
            backup_max_age.clone(),
        );
        let restore_max_age = SecondsGauge::default();
        registry.register(
            "restore_max_age_seconds",
            "How old the last verified restore may get (the drill interval plus 30 minutes)",
            restore_max_age.clone(),
        );
        let watch_last_alive = Family::<WatchLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "watch_last_alive_timestamp_seconds",
            "Unix time of the watch's last sign of life: a list, an event, or an answer to its watch request",
            watch_last_alive.clone(),
        );
        let watch_synced = Family::<WatchLabels, Gauge>::default();
        registry.register("watch_synced", "1 while the watch's cache is complete", watch_synced.clone());
        let watch_restarts = Family::<WatchLabels, Counter>::default();
        registry.register(
            "watch_restarts",
            "Restarts of the watch (fresh lists after the first)",
            watch_restarts.clone(),
        );
        Self {
            registry,
            reconciliations,
            errors,
            invalid_specs,
            duration,
            writes,
            steps,
            leader,
            backup_runs,
            backup_last_success,
            restore_last_verified,
            backup_max_age,
            restore_max_age,
            watch_last_alive,
            watch_synced,
            watch_restarts,
        }
    }
}

impl Metrics {
    pub fn observe(&self, controller: &'static str, took: Duration) {
        let labels = ControllerLabels { controller };
        self.reconciliations.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(took.as_secs_f64());
    }

    pub fn error(&self, controller: &'static str, reason: &'static str) {
        self.errors.get_or_create(&ErrorLabels { controller, reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub type SharedMetrics = Arc<Metrics>;
