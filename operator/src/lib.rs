//! fhir-operator: runs FHIR endpoints on Kubernetes the way a careful
//! platform team would by hand.

pub mod api;
pub mod fhirendpoint;
pub mod gateway_metrics;
