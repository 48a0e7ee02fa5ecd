//! The operator's own Prometheus metrics.

use std::sync::Arc;
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
        Self { registry, reconciliations, errors, invalid_specs, duration, writes, steps, leader }
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
