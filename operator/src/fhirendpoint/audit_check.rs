//! The audit trail seen from the operator: the endpoint's signing key
//! (kept in a Secret it creates once and never rotates silently), and the
//! operator's own periodic verification of the trail at its destination,
//! from which the `auditLog` compliance entry is computed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::audit::{Audit, signing_key_secret};
use crate::audit::{PUBLIC_KEY_ENTRY, SIGNING_KEY_ENTRY};
use crate::storage::DestinationArgs;

/// Longest a verification may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// The public half of the endpoint's signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub pem: String,
    pub base64: String,
    pub key_id: String,
}

/// Reads the endpoint's signing key Secret, creating it with a new key
/// the first time. The Secret has no owner (it outlives the endpoint: the
/// trail must stay verifiable for its retention). Errors never hold key
/// material.
pub async fn signing_key(client: &Client, namespace: &str, endpoint: &str) -> Result<PublicKey, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = signing_key_secret(endpoint);
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(&name).await.map_err(|e| format!("reading Secret {name}: {e}"))? {
            let data = secret.data.unwrap_or_default();
            let public = data
                .get(PUBLIC_KEY_ENTRY)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .ok_or_else(|| format!("Secret {name} has no {PUBLIC_KEY_ENTRY}"))?;
            if !data.contains_key(SIGNING_KEY_ENTRY) {
                return Err(format!("Secret {name} has no {SIGNING_KEY_ENTRY}"));
            }
            let key = crate::audit::parse_public_key(&public).map_err(|e| format!("Secret {name}: {e}"))?;
            use base64ct::Encoding;
            return Ok(PublicKey {
                base64: base64ct::Base64::encode_string(key.as_bytes()),
                key_id: crate::audit::key_id(&key),
                pem: public,
            });
        }
        let pair = crate::audit::generate_signing_key().map_err(|e| format!("generating the audit key: {e}"))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (crate::meta::MANAGED_BY_LABEL.to_owned(), crate::meta::MANAGED_BY.to_owned()),
                    (super::build::ENDPOINT_LABEL.to_owned(), endpoint.to_owned()),
                ])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (SIGNING_KEY_ENTRY.to_owned(), ByteString(pair.private_pem.as_bytes().to_vec())),
                (PUBLIC_KEY_ENTRY.to_owned(), ByteString(pair.public_pem.clone().into_bytes())),
            ])),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            // Another reconcile made it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("creating Secret {name}: {e}")),
        }
    }
    Err(format!("Secret {name} could not be read back"))
}

/// What the last verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The operator cannot read the destination (a PersistentVolumeClaim).
    NotVerifiable(String),
    /// The destination could not be read (the message names it).
    Unreadable(String),
    Verified {
        /// Newest seal over every stream.
        last_seal: Option<Timestamp>,
        records: u64,
        streams: usize,
        /// The first problem found, naming the segment and record.
        problem: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Checked {
    pub at: Timestamp,
    pub verification: Verification,
}

/// Verifications by endpoint (`namespace/name`), at most one per
/// `sealEvery`.
#[derive(Default)]
pub struct AuditChecks {
    last: Mutex<HashMap<String, Checked>>,
}

impl AuditChecks {
    /// The newest verification of the endpoint's trail, made now when the
    /// previous one is older than `sealEvery`, and when it is next due.
    pub async fn check(
        &self,
        client: &Client,
        namespace: &str,
        endpoint: &str,
        audit: &Audit,
        key: &PublicKey,
        now: Timestamp,
    ) -> (Checked, Timestamp) {
        let id = format!("{namespace}/{endpoint}");
        let previous = self.last.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        if let Some(previous) = previous
            && previous.at + audit.seal_every > now
        {
            return (previous.clone(), previous.at + audit.seal_every);
        }
        let verification = match tokio::time::timeout(VERIFY_TIMEOUT, verify(client, namespace, audit, key)).await {
            Ok(v) => v,
            Err(_) => Verification::Unreadable(format!("verification took longer than {VERIFY_TIMEOUT:?}")),
        };
        let checked = Checked { at: now, verification };
        self.last.lock().unwrap_or_else(|e| e.into_inner()).insert(id, checked.clone());
        (checked, now + audit.seal_every)
    }
}

/// Opens the endpoint's trail at its S3 destination, with the credentials
/// of its Secret. A PersistentVolumeClaim cannot be read from here.
pub async fn open_destination(
    client: &Client,
    namespace: &str,
    audit: &Audit,
) -> Result<crate::audit::store::AuditStore, Verification> {
    let Some(s3) = &audit.destination.s3 else {
        return Err(Verification::NotVerifiable(
            "the operator cannot read a PersistentVolumeClaim: run `fhir-operator audit verify --dir` where it is mounted"
                .into(),
        ));
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let credentials = match secrets.get_opt(&s3.credentials_secret).await {
        Ok(Some(secret)) => {
            let data = secret.data.unwrap_or_default();
            let value = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok()).unwrap_or_default();
            (value("accessKeyId"), value("secretAccessKey"))
        }
        Ok(None) => return Err(Verification::Unreadable(format!("Secret {} does not exist", s3.credentials_secret))),
        Err(e) => return Err(Verification::Unreadable(format!("reading Secret {}: {e}", s3.credentials_secret))),
    };
    let args = DestinationArgs {
        dir: None,
        s3_bucket: Some(s3.bucket.clone()),
        s3_prefix: s3.prefix.clone(),
        s3_endpoint: s3.endpoint.clone(),
        s3_region: s3.region.clone(),
    };
    crate::audit::store::AuditStore::open_with(&args, credentials).map_err(|e| Verification::Unreadable(e.to_string()))
}

async fn verify(client: &Client, namespace: &str, audit: &Audit, key: &PublicKey) -> Verification {
    let store = match open_destination(client, namespace, audit).await {
        Ok(store) => store,
        Err(why) => return why,
    };
    let verifying = match crate::audit::parse_public_key(&key.pem) {
        Ok(k) => k,
        Err(e) => return Verification::Unreadable(format!("the public key: {e}")),
    };
    match crate::audit::verify::verify(&store, &verifying, None).await {
        Err(e) => Verification::Unreadable(e.to_string()),
        Ok(report) => Verification::Verified {
            last_seal: report.streams.iter().filter_map(|s| s.last_seal.parse::<Timestamp>().ok()).max(),
            records: report.streams.iter().map(|s| s.records).sum(),
            streams: report.streams.len(),
            problem: report
                .streams
                .iter()
                .find_map(|s| s.problem.as_ref().map(|p| format!("stream {}: {p}", s.stream))),
        },
    }
}
