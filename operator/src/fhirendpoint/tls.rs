//! The gateway's certificate: inspected for the `tls` compliance check and,
//! when the endpoint has no `spec.tls`, issued and renewed by the operator
//! (self-signed ECDSA P-256, 90 days, renewed 30 days before expiry).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use x509_parser::extensions::GeneralName;

use crate::meta::sha256_hex;

pub const VALIDITY: SignedDuration = SignedDuration::from_hours(90 * 24);
pub const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(30 * 24);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Secret {0} has no tls.crt")]
    MissingCertificate(String),
    #[error("Secret {secret}: tls.crt is not a PEM X.509 certificate: {reason}")]
    Unparseable { secret: String, reason: String },
    #[error("issuing a certificate: {0}")]
    Issue(String),
}

/// What the operator knows of a certificate (all public).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint: String,
    pub dns_names: Vec<String>,
}

impl CertInfo {
    pub fn valid_at(&self, now: Timestamp) -> bool {
        self.not_before <= now && now < self.not_after
    }

    pub fn covers(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.dns_names.contains(n))
    }
}

/// Reads the certificate (the first PEM block of `tls.crt`) of a Secret.
pub fn inspect(secret: &Secret) -> Result<CertInfo, TlsError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let pem = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .ok_or_else(|| TlsError::MissingCertificate(name.clone()))?;
    inspect_pem(&pem.0).map_err(|reason| TlsError::Unparseable { secret: name, reason })
}

fn inspect_pem(pem: &[u8]) -> Result<CertInfo, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    let cert = block.parse_x509().map_err(|e| e.to_string())?;
    let time = |t: i64| Timestamp::from_second(t).map_err(|e| e.to_string());
    let dns_names = match cert.subject_alternative_name().map_err(|e| e.to_string())? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    Ok(CertInfo {
        not_before: time(cert.validity().not_before.timestamp())?,
        not_after: time(cert.validity().not_after.timestamp())?,
        fingerprint: sha256_hex(&block.contents),
        dns_names,
    })
}

/// The DNS names a gateway certificate must cover.
pub fn dns_names(endpoint: &str, namespace: &str) -> Vec<String> {
    vec![
        endpoint.to_owned(),
        format!("{endpoint}.{namespace}"),
        format!("{endpoint}.{namespace}.svc"),
        format!("{endpoint}.{namespace}.svc.cluster.local"),
    ]
}

/// Whether a self-issued certificate must be (re)issued now.
pub fn needs_issuing(current: Option<&CertInfo>, names: &[String], now: Timestamp) -> bool {
    match current {
        None => true,
        Some(cert) => !cert.valid_at(now) || !cert.covers(names) || now + RENEW_BEFORE >= cert.not_after,
    }
}

/// When the operator must next look at a self-issued certificate.
pub fn renewal_due(cert: &CertInfo) -> Timestamp {
    cert.not_after - RENEW_BEFORE
}

/// A new self-signed certificate and key (PEM) for `names`, valid from now.
/// The key is generated with the operating system's CSPRNG.
pub fn issue(names: &[String], now: Timestamp) -> Result<(String, String), TlsError> {
    let err = |e: rcgen::Error| TlsError::Issue(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(err)?;
    let at = |t: Timestamp| {
        time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|e| TlsError::Issue(e.to_string()))
    };
    // A minute of slack for clocks slightly behind the operator's.
    params.not_before = at(now - SignedDuration::from_mins(1))?;
    params.not_after = at(now + VALIDITY)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The `kubernetes.io/tls` Secret holding an issued certificate.
pub fn secret(metadata: ObjectMeta, cert_pem: String, key_pem: String) -> Secret {
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(cert_pem.into_bytes())),
            ("tls.key".to_owned(), ByteString(key_pem.into_bytes())),
        ])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn issued_certificates_cover_the_service_names_for_90_days() {
        let names = dns_names("patients", "clinic");
        let (cert, key) = issue(&names, now()).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        let secret = secret(ObjectMeta { name: Some("patients-tls".into()), ..Default::default() }, cert, key);
        let info = inspect(&secret).unwrap();
        assert!(info.covers(&names));
        assert!(info.valid_at(now()));
        assert_eq!(info.not_after, now() + VALIDITY);
        assert_eq!(info.fingerprint.len(), 64);
    }

    #[test]
    fn renewal_is_due_30_days_before_expiry_or_when_names_change() {
        let names = dns_names("patients", "clinic");
        let (cert, key) = issue(&names, now()).unwrap();
        let info = inspect(&secret(ObjectMeta::default(), cert, key)).unwrap();
        assert!(!needs_issuing(Some(&info), &names, now()));
        assert!(!needs_issuing(Some(&info), &names, now() + SignedDuration::from_hours(59 * 24)));
        assert!(needs_issuing(Some(&info), &names, now() + SignedDuration::from_hours(61 * 24)));
        assert!(needs_issuing(Some(&info), &dns_names("other", "clinic"), now()));
        assert!(needs_issuing(None, &names, now()));
        assert_eq!(renewal_due(&info), now() + SignedDuration::from_hours(60 * 24));
    }

    #[test]
    fn a_secret_without_a_certificate_is_reported_by_name() {
        let s =
            Secret { metadata: ObjectMeta { name: Some("mine".into()), ..Default::default() }, ..Default::default() };
        assert_eq!(inspect(&s).unwrap_err().to_string(), "Secret mine has no tls.crt");
        let mut garbage = s.clone();
        garbage.data = Some(BTreeMap::from([("tls.crt".to_owned(), ByteString(b"not a cert".to_vec()))]));
        assert!(inspect(&garbage).unwrap_err().to_string().starts_with("Secret mine: tls.crt is not a PEM"));
    }
}
