//! fhir-operator: runs FHIR endpoints on Kubernetes the way a careful
//! platform team would by hand.

pub mod api;
pub mod apply;
pub mod audit;
pub mod backup;
pub mod caches;
pub mod chart;
pub mod conditions;
pub mod discovery;
pub mod fhirendpoint;
pub mod gateway_auth;
pub mod gateway_metrics;
pub mod health;
pub mod jobs;
pub mod keyrotation;
pub mod leader;
pub mod meta;
pub mod metrics;
pub mod ratelimittier;
pub mod rbac;
pub mod render;
pub mod run;
pub mod server;
pub mod smart;
pub mod storage;
pub mod telemetry;
pub mod validation;

/// Chooses ring as the process-wide TLS provider (kube's), before any
/// client is built: two providers are linked (object_store's S3 client
/// brings aws-lc-rs), and rustls refuses to guess. Idempotent.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
