//! The audit trail (issue 14): lossless, hash-chained, signed, retained.
//!
//! nginx appends one JSON access-log line per request to a file on an
//! emptyDir; the `audit-sidecar` container follows it and turns each line
//! into a [`record::Record`] (IHE BALP / FHIR AuditEvent shape, no query
//! strings, bodies, keys or tokens), chains it ([`chain`]), and every
//! `sealEvery` writes the records since the last seal as a segment and a
//! signed checkpoint to the destination ([`store`]). `fhir-operator audit
//! verify` proves the trail complete and unaltered; `audit query` answers
//! an auditor's question.
//!
//! # Storage layout (under the directory, or the S3 prefix)
//! ```text
//! <stream>/segments/<first record time>-<first seq, 20 digits>.jsonl   one canonical Record per line
//! <stream>/checkpoints/<index, 20 digits>.json                          SignedCheckpoint
//! ```
//! One stream per sidecar (`--stream`, default the pod's hostname).
//!
//! # Wiring it (the operator side)
//! - Key: [`generate_signing_key`]`() -> Result<KeyPair, KeyError>` gives
//!   `private_pem` (PKCS#8, for the endpoint's Secret, mounted into the
//!   sidecar and named by `--signing-key`), `public_pem` and
//!   `public_base64` (status and a ConfigMap; `audit verify --public-key`
//!   takes either). [`parse_signing_key`], [`parse_public_key`], [`key_id`].
//! - Gateway: `GatewaySettings::access_log` = [`ACCESS_LOG_FILE`] on an
//!   emptyDir mounted at [`ACCESS_LOG_DIR`] in nginx and the sidecar.
//! - Sidecar container: `fhir-operator audit-sidecar --access-log
//!   /var/log/fhir-gateway/access.log --signing-key /etc/fhir-audit/signing-key.pem
//!   --seal-every 5m --retention 6y` plus the destination flags of
//!   [`store::DestinationArgs`] (`--dir` a PVC mount, or `--s3-bucket`,
//!   `--s3-prefix`, `--s3-endpoint`, `--s3-region` with
//!   `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from the Secret); it also
//!   serves the gateway metrics on `--metrics-listen` (9113), so it replaces
//!   the `gateway-metrics` container and nginx's syslog copy. Build its
//!   arguments with [`sidecar_args`].
//! - Spec: `retention` and `sealEvery` parse with [`parse_duration`].
//! - Compliance: [`verify::verify`]`(&AuditStore, &VerifyingKey, Option<&str>)
//!   -> Result<Report, StoreError>`; `Report::ok()`, and each stream's
//!   `last_seal`, `records`, `problem`.
//! - Metrics for alerts: `metrics::CLIENT_DISTINCT_PATIENTS` (label
//!   `client`), `metrics::LAST_SEAL_TIMESTAMP_SECONDS`,
//!   `metrics::SEAL_ERRORS_TOTAL`, `metrics::SOURCE_RESETS_TOTAL`.

pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod metrics;
pub mod query;
pub mod record;
pub mod retention;
pub mod segment;
pub mod sidecar;
pub mod store;
pub mod summary;
pub mod tail;
pub mod verify;

pub use checkpoint::{KeyError, KeyPair, generate_signing_key, key_id, parse_public_key, parse_signing_key};
pub use record::{Interaction, interaction, patient_id};
pub use retention::parse_duration;

/// Where the sidecar expects the emptyDir shared with nginx.
pub const ACCESS_LOG_DIR: &str = "/var/log/fhir-gateway";
/// The access-log file nginx writes and the sidecar follows.
pub const ACCESS_LOG_FILE: &str = "/var/log/fhir-gateway/access.log";
/// Where the signing key's Secret is mounted, and its entry.
pub const SIGNING_KEY_DIR: &str = "/etc/fhir-audit";
pub const SIGNING_KEY_ENTRY: &str = "signing-key.pem";
pub const PUBLIC_KEY_ENTRY: &str = "public-key.pem";

/// The sidecar's arguments (after `audit-sidecar`) for a destination given
/// as flags (`--dir /x` or `--s3-bucket b --s3-prefix p ...`).
pub fn sidecar_args(seal_every: &str, retention: &str, destination: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--access-log",
        ACCESS_LOG_FILE,
        "--signing-key",
        &format!("{SIGNING_KEY_DIR}/{SIGNING_KEY_ENTRY}"),
        "--seal-every",
        seal_every,
        "--retention",
        retention,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(destination.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn sidecar_args_are_what_the_sidecar_accepts() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: sidecar::SidecarArgs,
        }
        let destination = ["--s3-bucket".to_owned(), "fhir-audit".to_owned(), "--s3-prefix".to_owned(), "p".to_owned()];
        let mut argv = vec!["audit-sidecar".to_owned(), "--stream".to_owned(), "patients-0".to_owned()];
        argv.extend(sidecar_args("5m", "6y", &destination));
        let args = Cli::try_parse_from(argv).expect("parses").args;
        assert_eq!(args.access_log.to_str(), Some(ACCESS_LOG_FILE));
        assert_eq!(args.signing_key.to_str(), Some("/etc/fhir-audit/signing-key.pem"));
        assert_eq!(args.seal_every, std::time::Duration::from_secs(300));
        assert_eq!(args.retention, parse_duration("6y").expect("duration"));
        assert_eq!(
            (args.destination.s3_bucket.as_deref(), args.destination.s3_prefix.as_str()),
            (Some("fhir-audit"), "p")
        );
        assert_eq!(args.metrics_listen.port(), crate::fhirendpoint::gateway::METRICS_PORT);
    }
}
