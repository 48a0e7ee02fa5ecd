//! Monitoring children of a FhirEndpoint: a ServiceMonitor that scrapes
//! the gateway-metrics sidecar, and a PrometheusRule with the endpoint's
//! alerts (monitoring.coreos.com/v1, created only when the cluster serves
//! those kinds). Typed structs for the fields this operator sets.

/// SLO thresholds and names that the alerts are rendered from.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    pub namespace: String,
    /// The endpoint's name (also its Service's name).
    pub endpoint: String,
    /// p99 latency threshold in seconds.
    pub latency_p99_seconds: f64,
    /// Share of 5xx responses that alerts, 0 to 1.
    pub error_ratio: f64,
}
