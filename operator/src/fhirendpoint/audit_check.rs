//! The audit trail seen from the operator: the endpoint's signing key
//! (kept in a Secret it creates once and never rotates silently), and the
//! operator's own periodic verification of the trail at its destination,
//! from which the `auditLog` compliance entry is computed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams, PropagationPolicy};
use kube::{Api, Client};
use tracing::{info, warn};

use super::audit::{Audit, signing_key_secret};
use super::audit_job::{self, JobResult, VerifyJobInputs};
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
    /// The operator cannot read the destination (a PersistentVolumeClaim)
    /// from where it runs (`audit verify --endpoint`).
    NotVerifiable(String),
    /// The period's verification Job has not finished (PersistentVolumeClaim).
    Pending(String),
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
    /// PersistentVolumeClaims: the result of the newest finished Job, by
    /// endpoint, with the Job's name.
    by_job: Mutex<HashMap<String, (String, Checked)>>,
}

/// How often a running verification Job is looked at.
const JOB_POLL: Duration = Duration::from_secs(5);

/// What a verification Job of the endpoint is made from.
#[derive(Debug, Clone)]
pub struct JobSource<'a> {
    pub owner: &'a OwnerReference,
    /// The operator's own image.
    pub image: &'a str,
}

impl AuditChecks {
    /// The newest verification of the endpoint's trail, made now when the
    /// previous one is older than `sealEvery`, and when it is next due.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        client: &Client,
        namespace: &str,
        endpoint: &str,
        audit: &Audit,
        key: &PublicKey,
        source: &JobSource<'_>,
        now: Timestamp,
    ) -> (Checked, Timestamp) {
        let id = format!("{namespace}/{endpoint}");
        if audit.destination.persistent_volume_claim.is_some() {
            return self.check_by_job(client, namespace, endpoint, audit, key, source, now).await;
        }
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

impl AuditChecks {
    /// A trail on a PersistentVolumeClaim: the period's verification Job,
    /// created if missing, and its result once it finished. Only a result
    /// of the current period's Job counts; until it is in, `Pending`.
    #[allow(clippy::too_many_arguments)]
    async fn check_by_job(
        &self,
        client: &Client,
        namespace: &str,
        endpoint: &str,
        audit: &Audit,
        key: &PublicKey,
        source: &JobSource<'_>,
        now: Timestamp,
    ) -> (Checked, Timestamp) {
        let id = format!("{namespace}/{endpoint}");
        let period = audit_job::period_start(now, audit.seal_every);
        let next_period = period + audit.seal_every;
        let built = audit_job::build(&VerifyJobInputs {
            endpoint,
            namespace,
            owner: source.owner.clone(),
            audit,
            public_key_base64: &key.base64,
            image: source.image,
            period,
        });
        let name = built.metadata.name.clone().unwrap_or_default();
        let known = self.by_job.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        if let Some((job, checked)) = known
            && job == name
        {
            return (checked, next_period);
        }
        let soon = (now + JOB_POLL).min(next_period);
        let at_now = |verification| Checked { at: now, verification };
        let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
        let found = match jobs.get_opt(&name).await {
            Ok(Some(job)) => job,
            Ok(None) => match jobs.create(&PostParams::default(), &built).await {
                Ok(job) => {
                    info!(namespace, endpoint, job = %name, "audit verification Job created");
                    delete_superseded(&jobs, endpoint, &name).await;
                    job
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    return (at_now(Verification::Pending(format!("verification Job {name} was just created"))), soon);
                }
                Err(e) => {
                    let why = format!("creating the verification Job {name}: {e}");
                    return (at_now(Verification::Unreadable(why)), now + JOB_POLL * 2);
                }
            },
            Err(e) => {
                let why = format!("reading the verification Job {name}: {e}");
                return (at_now(Verification::Unreadable(why)), now + JOB_POLL * 2);
            }
        };
        if !audit_job::is_built(&found, &built) {
            if !audit_job::same_owner(&found, &built) {
                let why = format!("Job {name} is not the endpoint's verification Job: its result is not evidence");
                return (at_now(Verification::Unreadable(why)), next_period);
            }
            // The endpoint's, from another image or key (the operator was
            // upgraded within the period): replaced, not believed.
            let params = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
            if let Err(e) = jobs.delete(&name, &params).await {
                warn!(endpoint, job = %name, error = %e, "deleting an outdated audit verification Job");
            }
            let why = format!("verification Job {name} was built otherwise (another image or key): replacing it");
            return (at_now(Verification::Pending(why)), soon);
        }
        let pods = if crate::jobs::finished(&found).is_some() {
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            match pods.list(&ListParams::default().labels(&format!("job-name={name}"))).await {
                Ok(list) => list.items,
                Err(e) => {
                    let why = format!("reading the pods of verification Job {name}: {e}");
                    return (at_now(Verification::Unreadable(why)), now + JOB_POLL * 2);
                }
            }
        } else {
            Vec::new()
        };
        match audit_job::result_of(&found, &pods, now) {
            JobResult::Running => {
                let previous = self.by_job.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
                match previous {
                    // The last finished verification stays in force while
                    // the next one runs, for two periods at most: the entry
                    // does not drop to Unknown at every period's start.
                    Some((_, checked)) if checked.at + audit.seal_every + audit.seal_every > now => (checked, soon),
                    Some((job, checked)) => {
                        let last = format!("the last finished verification, Job {job}, ended {}", checked.at);
                        (at_now(Verification::Pending(format!("verification Job {name} runs; {last}"))), soon)
                    }
                    None => {
                        let last = "no verification has finished yet";
                        (at_now(Verification::Pending(format!("verification Job {name} runs; {last}"))), soon)
                    }
                }
            }
            JobResult::Finished { at, verification } => {
                let checked = Checked { at, verification };
                self.by_job.lock().unwrap_or_else(|e| e.into_inner()).insert(id, (name, checked.clone()));
                (checked, next_period)
            }
        }
    }
}

/// Deletes the endpoint's verification Jobs of earlier periods (a running
/// one is superseded); `ttlSecondsAfterFinished` is the backstop.
async fn delete_superseded(jobs: &Api<Job>, endpoint: &str, current: &str) {
    let selector = format!("{}={endpoint}", audit_job::VERIFY_LABEL);
    let list = match jobs.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list,
        Err(e) => return warn!(endpoint, error = %e, "listing earlier audit verification Jobs"),
    };
    let params = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
    for job in list.items {
        let Some(name) = job.metadata.name else { continue };
        if name == current {
            continue;
        }
        match jobs.delete(&name, &params).await {
            Ok(_) => info!(endpoint, job = %name, "superseded audit verification Job deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => warn!(endpoint, job = %name, error = %e, "deleting a superseded audit verification Job"),
        }
    }
}

/// Opens the endpoint's trail at its S3 destination, with the credentials
/// of its Secret. A PersistentVolumeClaim cannot be read from here (the
/// operator verifies one with a Job, [`audit_job`]).
pub async fn open_destination(
    client: &Client,
    namespace: &str,
    audit: &Audit,
) -> Result<crate::audit::store::AuditStore, Verification> {
    let Some(s3) = &audit.destination.s3 else {
        return Err(Verification::NotVerifiable(
            "a PersistentVolumeClaim cannot be read from here: run `fhir-operator audit verify --dir` where it is mounted \
             (the operator verifies it with a Job every sealEvery)"
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
