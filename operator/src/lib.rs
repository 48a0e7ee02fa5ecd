//! fhir-operator: runs FHIR endpoints on Kubernetes the way a careful
//! platform team would by hand.

pub mod api;
pub mod apply;
pub mod chart;
pub mod conditions;
pub mod discovery;
pub mod fhirendpoint;
pub mod gateway_metrics;
pub mod keyrotation;
pub mod leader;
pub mod meta;
pub mod metrics;
pub mod ratelimittier;
pub mod rbac;
pub mod render;
pub mod run;
pub mod server;
pub mod telemetry;
