//! `spec.audit` → the audit sidecar's settings. Pure; the reconciler keeps
//! the signing key's Secret and verifies the trail (`audit_check.rs`).

use std::time::Duration;

use super::validate::InvalidSpec;
use crate::api::{AuditSpec, BackupDestination};

/// The audit sidecar's container (it also serves the gateway's metrics).
pub const AUDIT_CONTAINER: &str = "audit-sidecar";
/// Where a PersistentVolumeClaim destination is mounted in the sidecar.
pub const AUDIT_MOUNT: &str = "/var/lib/fhir-audit";
/// The public key in the gateway's ConfigMap (PEM).
pub const PUBLIC_KEY_CONFIG_KEY: &str = "audit-public-key.pem";
/// How long a terminating pod's sidecar keeps following the access log
/// before its last seal: past the gateway's drain and graceful quit.
pub const SHUTDOWN_GRACE_SECONDS: u32 = super::pod::GATEWAY_DRAIN_SECONDS + 8;
/// Shortest and longest `sealEvery`.
const SEAL_RANGE: (u64, u64) = (10, 24 * 3600);

/// The Secret holding the endpoint's Ed25519 signing key. It has no owner:
/// it outlives the endpoint, so that the trail stays verifiable for its
/// whole retention.
pub fn signing_key_secret(endpoint: &str) -> String {
    format!("{endpoint}-audit-key")
}

/// A checked `spec.audit`.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    pub destination: BackupDestination,
    pub seal_every: Duration,
    pub seal_every_text: String,
    pub retention_text: String,
    /// UTC hours `[start, end)` when requests are expected.
    pub active_hours: Option<(u8, u8)>,
    pub distinct_patients_per_hour: u32,
}

impl Audit {
    /// `PersistentVolumeClaim/<name>` or `s3 bucket <b>/<prefix>`.
    pub fn describe(&self) -> String {
        match (&self.destination.persistent_volume_claim, &self.destination.s3) {
            (Some(pvc), _) => format!("PersistentVolumeClaim/{}", pvc.claim_name),
            (None, Some(s3)) => format!("s3 bucket {}/{}", s3.bucket, s3.prefix),
            (None, None) => String::new(),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec { field: field.into(), message: message.into() }
}

/// Checks `spec.audit` beyond the schema.
pub fn check(spec: Option<&AuditSpec>) -> Result<Option<Audit>, InvalidSpec> {
    let Some(spec) = spec else { return Ok(None) };
    let destination = &spec.destination;
    match (&destination.persistent_volume_claim, &destination.s3) {
        (Some(pvc), None) => {
            crate::validation::dns_subdomain(&pvc.claim_name)
                .map_err(|e| invalid("spec.audit.destination.persistentVolumeClaim.claimName", e))?;
            if pvc.path.split('/').any(|p| p == "..") || pvc.path.starts_with('/') {
                return Err(invalid(
                    "spec.audit.destination.persistentVolumeClaim.path",
                    "must be relative, without ..",
                ));
            }
        }
        (None, Some(s3)) => {
            crate::validation::dns_subdomain(&s3.credentials_secret)
                .map_err(|e| invalid("spec.audit.destination.s3.credentialsSecret", e))?;
            if s3.bucket.len() < 3
                || s3.bucket.len() > 63
                || !s3.bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
            {
                return Err(invalid(
                    "spec.audit.destination.s3.bucket",
                    "must be an S3 bucket name (3-63 of a-z 0-9 - .)",
                ));
            }
            if let Some(endpoint) = &s3.endpoint {
                let url = url::Url::parse(endpoint)
                    .map_err(|e| invalid("spec.audit.destination.s3.endpoint", format!("{endpoint:?}: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(invalid("spec.audit.destination.s3.endpoint", "must be an http(s) URL with a host"));
                }
            }
        }
        _ => return Err(invalid("spec.audit.destination", "needs exactly one of persistentVolumeClaim and s3")),
    }
    let seal_every = crate::audit::parse_duration(&spec.seal_every)
        .filter(|d| (SEAL_RANGE.0..=SEAL_RANGE.1).contains(&d.as_secs()))
        .ok_or_else(|| {
            invalid("spec.audit.sealEvery", format!("{:?} must be from 10s to 24h, e.g. 5m", spec.seal_every))
        })?;
    let retention = crate::audit::parse_duration(&spec.retention).ok_or_else(|| {
        invalid("spec.audit.retention", format!("{:?} is not a duration such as 6y or 400d", spec.retention))
    })?;
    if retention < seal_every * 2 {
        return Err(invalid("spec.audit.retention", "must be at least twice sealEvery"));
    }
    let active_hours = match &spec.active_hours {
        None => None,
        Some(text) => {
            let parsed = text
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u8>().ok()?, b.parse::<u8>().ok()?)))
                .filter(|(a, b)| a < b && *b <= 24);
            Some(parsed.ok_or_else(|| {
                invalid(
                    "spec.audit.activeHours",
                    format!("{text:?} must be HH-HH in UTC with start < end <= 24, e.g. 07-19"),
                )
            })?)
        }
    };
    Ok(Some(Audit {
        active_hours,
        distinct_patients_per_hour: spec
            .distinct_patients_per_hour
            .unwrap_or(super::monitoring::DEFAULT_DISTINCT_PATIENTS)
            .max(1),
        destination: destination.clone(),
        seal_every,
        seal_every_text: spec.seal_every.clone(),
        retention_text: spec.retention.clone(),
    }))
}

/// The S3 endpoint's port, for the pod's egress (443 without an endpoint).
pub fn s3_port(audit: &Audit) -> Option<u16> {
    let s3 = audit.destination.s3.as_ref()?;
    match &s3.endpoint {
        None => Some(443),
        Some(endpoint) => url::Url::parse(endpoint).ok()?.port_or_known_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PvcDestination, S3Destination};

    fn spec() -> AuditSpec {
        AuditSpec {
            destination: BackupDestination {
                persistent_volume_claim: None,
                s3: Some(S3Destination {
                    bucket: "fhir-audit".into(),
                    prefix: "prod/patients".into(),
                    endpoint: Some("http://minio.storage.svc:9000".into()),
                    region: None,
                    credentials_secret: "audit-s3".into(),
                }),
            },
            retention: "6y".into(),
            seal_every: "5m".into(),
            active_hours: Some("07-19".into()),
            distinct_patients_per_hour: None,
        }
    }

    #[test]
    fn a_valid_spec_checks() {
        let audit = check(Some(&spec())).unwrap().unwrap();
        assert_eq!(audit.seal_every, Duration::from_secs(300));
        assert_eq!(s3_port(&audit), Some(9000));
        assert_eq!(audit.describe(), "s3 bucket fhir-audit/prod/patients");
        assert_eq!((audit.active_hours, audit.distinct_patients_per_hour), (Some((7, 19)), 500));
        assert_eq!(check(None).unwrap(), None);
    }

    #[test]
    fn each_refusal_names_its_field() {
        let field = |edit: &dyn Fn(&mut AuditSpec)| {
            let mut s = spec();
            edit(&mut s);
            check(Some(&s)).unwrap_err().field
        };
        assert_eq!(field(&|s| s.seal_every = "1s".into()), "spec.audit.sealEvery");
        assert_eq!(field(&|s| s.active_hours = Some("19-07".into())), "spec.audit.activeHours");
        assert_eq!(field(&|s| s.retention = "forever".into()), "spec.audit.retention");
        assert_eq!(field(&|s| s.retention = "1m".into()), "spec.audit.retention");
        assert_eq!(
            field(&|s| s.destination.s3.as_mut().unwrap().bucket = "UP".into()),
            "spec.audit.destination.s3.bucket"
        );
        assert_eq!(
            field(&|s| s.destination.s3.as_mut().unwrap().endpoint = Some("ftp://x".into())),
            "spec.audit.destination.s3.endpoint"
        );
        assert_eq!(
            field(&|s| {
                s.destination.persistent_volume_claim =
                    Some(PvcDestination { claim_name: "audit".into(), path: String::new() })
            }),
            "spec.audit.destination"
        );
    }
}
