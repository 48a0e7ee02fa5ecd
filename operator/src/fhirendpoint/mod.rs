//! The FhirEndpoint controller: dereference → validate → build → apply →
//! status, with `build` pure (no client, no clock).

pub mod audit;
pub mod audit_check;
pub mod audit_job;
pub mod auth;
pub mod build;
pub mod compliance;
pub mod controller;
pub mod database;
pub mod gateway;
pub mod jwks;
pub mod monitoring;
pub mod network;
pub mod pod;
pub mod reconcile;
pub mod tls;
pub mod validate;
