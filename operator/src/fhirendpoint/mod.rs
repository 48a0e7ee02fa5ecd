//! The FhirEndpoint controller: dereference → validate → build → apply →
//! status, with `build` pure (no client, no clock).

pub mod gateway;
pub mod monitoring;
