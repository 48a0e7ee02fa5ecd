//! The verification Job of a trail on a PersistentVolumeClaim, and how its
//! result is read. Pure: `audit_check.rs` creates, reads and deletes.
//!
//! The operator cannot mount a claim, so once per `sealEvery` period it
//! runs one Job (named after the endpoint and the period's start, so a
//! restart or a second reconcile finds the same one) that mounts the claim
//! read-only and runs the operator's own image: `fhir-operator audit verify
//! --dir /audit --public-key-base64 KEY --summary /dev/termination-log`.
//! The public key is the one published in `status.audit.publicKey`, given
//! in the Job's (immutable) spec; the signing key's Secret is not mounted.
//! The result is the container's termination message, a
//! [`Summary`](crate::audit::summary::Summary) parsed strictly, and it
//! counts only from a Job and a pod that are the ones built here.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Container, PersistentVolumeClaimVolumeSource, Pod, PodAffinity, PodAffinityTerm, PodSecurityContext,
    PodSpec, PodTemplateSpec, ResourceRequirements, SeccompProfile, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use sha2::{Digest, Sha256};

use super::audit::Audit;
use super::audit_check::Verification;
use super::build::selector_labels;
use super::pod::{RUN_AS, restricted_container};
use crate::audit::summary::{Outcome, Summary};

/// Label naming the endpoint on its verification Jobs.
pub const VERIFY_LABEL: &str = "fhiroperator.io/audit-verify";
/// Annotation holding the period a Job verifies for (RFC 3339).
pub const PERIOD_ANNOTATION: &str = "fhiroperator.io/audit-period";
pub const VERIFY_CONTAINER: &str = "verify";
/// Where the claim is mounted, read-only.
pub const MOUNT: &str = "/audit";
pub use crate::jobs::TERMINATION_LOG;
/// Kubernetes names that are label values (a Job's `job-name`) stay within 63.
const NAME_LIMIT: usize = 63;

/// What a verification Job needs.
#[derive(Debug, Clone)]
pub struct VerifyJobInputs<'a> {
    pub endpoint: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub audit: &'a Audit,
    /// `status.audit.publicKey`: the Ed25519 key's 32 bytes in base64.
    pub public_key_base64: &'a str,
    /// The operator's own image.
    pub image: &'a str,
    /// The start of the period verified.
    pub period: Timestamp,
}

/// The start of the `sealEvery` period holding `now` (periods count from
/// the Unix epoch, so every replica of the operator agrees).
pub fn period_start(now: Timestamp, seal_every: Duration) -> Timestamp {
    let every = seal_every.as_secs().max(1) as i64;
    let secs = now.as_second().div_euclid(every) * every;
    Timestamp::from_second(secs).unwrap_or(now)
}

/// `<endpoint>-audit-<period start, Unix seconds>`; a long endpoint name
/// is cut and keeps a hash of itself, so names stay distinct.
pub fn job_name(endpoint: &str, period: Timestamp) -> String {
    let suffix = format!("-audit-{}", period.as_second());
    if endpoint.len() + suffix.len() <= NAME_LIMIT {
        return format!("{endpoint}{suffix}");
    }
    let hash = hex::encode(&Sha256::digest(endpoint.as_bytes())[..3]);
    let keep = NAME_LIMIT - suffix.len() - hash.len() - 1;
    let cut = endpoint[..keep].trim_end_matches(['-', '.']);
    format!("{cut}-{hash}{suffix}")
}

fn labels(endpoint: &str) -> BTreeMap<String, String> {
    crate::jobs::labels("audit-verify", (VERIFY_LABEL, endpoint))
}

/// The verification container's arguments.
fn args(inputs: &VerifyJobInputs<'_>) -> Vec<String> {
    let mut args = vec!["audit".to_owned(), "verify".to_owned()];
    args.extend(inputs.audit.destination.agent_flags(MOUNT));
    args.push(format!("--public-key-base64={}", inputs.public_key_base64));
    args.push(format!("--summary={TERMINATION_LOG}"));
    args
}

/// The verification Job of one period.
pub fn build(inputs: &VerifyJobInputs<'_>) -> Job {
    let seal = inputs.audit.seal_every.as_secs() as i64;
    let labels = labels(inputs.endpoint);
    let claim = inputs.audit.destination.persistent_volume_claim.as_ref().map(|p| p.claim_name.clone());
    let container = Container {
        name: VERIFY_CONTAINER.into(),
        image: Some(inputs.image.to_owned()),
        args: Some(args(inputs)),
        volume_mounts: Some(vec![VolumeMount {
            name: "audit".into(),
            mount_path: MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        security_context: Some(restricted_container()),
        // Only the summary: a failing container's log is not read as its result.
        termination_message_policy: Some("File".into()),
        termination_message_path: Some(TERMINATION_LOG.into()),
        resources: Some(ResourceRequirements {
            requests: Some(
                [("cpu".to_owned(), Quantity("50m".into())), ("memory".to_owned(), Quantity("64Mi".into()))].into(),
            ),
            limits: Some(
                [("cpu".to_owned(), Quantity("500m".into())), ("memory".to_owned(), Quantity("512Mi".into()))].into(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    // A ReadWriteOnce claim mounts only on the node of the pod that has it:
    // prefer the endpoint's pods' node (required would never schedule while
    // the endpoint has no pod).
    let affinity = Affinity {
        pod_affinity: Some(PodAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: PodAffinityTerm {
                    label_selector: Some(LabelSelector {
                        match_labels: Some(selector_labels(inputs.endpoint)),
                        ..Default::default()
                    }),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..Default::default()
                },
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(inputs.endpoint, inputs.period)),
            namespace: Some(inputs.namespace.to_owned()),
            labels: Some(labels.clone()),
            annotations: Some([(PERIOD_ANNOTATION.to_owned(), inputs.period.to_string())].into()),
            owner_references: Some(vec![inputs.owner.clone()]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            // A verification that cannot finish within its period (a pod
            // that cannot mount the claim, a trail too long to check) fails
            // within it and says so; at least a minute for the pod to start.
            active_deadline_seconds: Some((seal * 9 / 10).max(60)),
            // The operator deletes superseded Jobs; this is the backstop.
            ttl_seconds_after_finished: Some((2 * seal).max(3600) as i32),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS),
                        // The uid the audit sidecar writes the trail as.
                        run_as_group: Some(RUN_AS),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..Default::default()
                    }),
                    affinity: Some(affinity),
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "audit".into(),
                        persistent_volume_claim: claim
                            .map(|claim_name| PersistentVolumeClaimVolumeSource { claim_name, read_only: Some(true) }),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// Whether both Jobs have the same controller (the endpoint, by uid).
pub fn same_owner(found: &Job, built: &Job) -> bool {
    let owner = |j: &Job| {
        j.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true)).map(|o| o.uid.clone())
    };
    owner(found).is_some() && owner(found) == owner(built)
}

/// Whether a Job found under the period's name is the one [`build`] made:
/// owned by the endpoint, the same image and arguments (the public key
/// among them), the same claim mounted read-only. Anything else is not
/// evidence.
pub fn is_built(found: &Job, built: &Job) -> bool {
    let pod = |j: &Job| j.spec.as_ref().and_then(|s| s.template.spec.clone());
    let (Some(found_pod), Some(built_pod)) = (pod(found), pod(built)) else { return false };
    let container = |p: &PodSpec| {
        p.containers.iter().find(|c| c.name == VERIFY_CONTAINER).map(|c| (c.image.clone(), c.args.clone()))
    };
    let claims = |p: &PodSpec| {
        p.volumes
            .iter()
            .flatten()
            .map(|v| v.persistent_volume_claim.as_ref().map(|c| (c.claim_name.clone(), c.read_only)))
            .collect::<Vec<_>>()
    };
    same_owner(found, built)
        && found_pod.containers.len() == 1
        && container(&found_pod) == container(&built_pod)
        && claims(&found_pod) == claims(&built_pod)
}

/// What a verification Job came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// Not finished yet.
    Running,
    Finished {
        at: Timestamp,
        verification: Verification,
    },
}

/// The result of the period's Job from its status and its pod: Pass-worthy
/// only when the Job completed, its own pod's container exited 0, and its
/// summary parses and says verified.
pub fn result_of(job: &Job, pods: &[Pod], now: Timestamp) -> JobResult {
    let Some((succeeded, mut at, job_said)) = crate::jobs::finished(job) else {
        return JobResult::Running;
    };
    let state = if succeeded { "completed" } else { "failed" };
    let name = job.metadata.name.clone().unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let image = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == VERIFY_CONTAINER))
        .and_then(|c| c.image.clone());
    // The Job's own pod: controlled by it (uid), running its image.
    let terminated = pods
        .iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.uid == uid && !uid.is_empty())
        })
        .filter(|p| {
            p.spec.as_ref().is_some_and(|s| {
                s.containers.len() == 1 && s.containers[0].name == VERIFY_CONTAINER && s.containers[0].image == image
            })
        })
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .filter(|c| c.name == VERIFY_CONTAINER)
        .find_map(|c| c.state.as_ref()?.terminated.clone());
    if let Some(t) = &terminated
        && let Some(finished) = &t.finished_at
    {
        at = Some(finished.0);
    }
    let at = at.unwrap_or(now);
    let unreadable = |why: String| JobResult::Finished { at, verification: Verification::Unreadable(why) };
    let Some(terminated) = terminated else {
        return unreadable(format!("verification Job {name} {state}: {job_said} (no result from its pod)"));
    };
    let summary = match terminated.message.as_deref().map(Summary::parse) {
        Some(Ok(summary)) => summary,
        Some(Err(e)) => return unreadable(format!("verification Job {name}: its result is refused: {e}")),
        None => {
            return unreadable(format!(
                "verification Job {name} {state}: exit code {} without a result",
                terminated.exit_code
            ));
        }
    };
    let completed = succeeded && terminated.exit_code == 0;
    let verification = match summary.result {
        Outcome::Verified if completed => Verification::Verified {
            last_seal: summary.last_checkpoint(),
            records: summary.records,
            streams: summary.streams as usize,
            problem: None,
        },
        Outcome::Verified => {
            return unreadable(format!(
                "verification Job {name} says verified but {state} with exit code {}: not evidence",
                terminated.exit_code
            ));
        }
        Outcome::Broken => Verification::Verified {
            last_seal: summary.last_checkpoint(),
            records: summary.records,
            streams: summary.streams as usize,
            problem: summary.problem.map(|p| p.to_string()),
        },
        Outcome::Error => {
            return unreadable(format!(
                "verification Job {name}: {}",
                summary.error.unwrap_or_else(|| "the trail could not be read".into())
            ));
        }
    };
    JobResult::Finished { at, verification }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BackupDestination, PvcDestination};

    fn audit() -> Audit {
        Audit {
            destination: BackupDestination {
                persistent_volume_claim: Some(PvcDestination {
                    claim_name: "patients-audit".into(),
                    path: "trail".into(),
                }),
                s3: None,
            },
            seal_every: Duration::from_secs(300),
            seal_every_text: "5m".into(),
            retention_text: "6y".into(),
            active_hours: None,
            distinct_patients_per_hour: 500,
        }
    }

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "fhiroperator.io/v1alpha1".into(),
            kind: "FhirEndpoint".into(),
            name: "patients".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    fn job(audit: &Audit) -> Job {
        build(&VerifyJobInputs {
            endpoint: "patients",
            namespace: "prod",
            owner: owner("ep-uid"),
            audit,
            public_key_base64: "MCowBQYDK2VwAyEA",
            image: "fhir-operator:1",
            period: "2026-01-01T00:05:00Z".parse().unwrap(),
        })
    }

    #[test]
    fn periods_and_names_are_deterministic() {
        let every = Duration::from_secs(300);
        let start = period_start("2026-01-01T00:09:59Z".parse().unwrap(), every);
        assert_eq!(start.to_string(), "2026-01-01T00:05:00Z");
        assert_eq!(period_start("2026-01-01T00:05:00Z".parse().unwrap(), every), start);
        assert_eq!(job_name("patients", start), "patients-audit-1767225900");
        let long = "a".repeat(60);
        let name = job_name(&long, start);
        assert!(name.len() <= 63 && name.ends_with("-audit-1767225900"), "{name}");
        assert_ne!(name, job_name(&format!("{}b", "a".repeat(59)), start), "a cut name keeps a hash");
        let dashed = format!("{}-{}", "a".repeat(38), "b".repeat(20));
        assert!(!job_name(&dashed, start).contains("--"), "{}", job_name(&dashed, start));
    }

    #[test]
    fn the_job_mounts_the_claim_read_only_and_is_restricted() {
        let job = job(&audit());
        assert_eq!(job.metadata.name.as_deref(), Some("patients-audit-1767225900"));
        assert_eq!(job.metadata.owner_references.as_ref().unwrap()[0].uid, "ep-uid");
        let spec = job.spec.clone().unwrap();
        assert_eq!((spec.backoff_limit, spec.active_deadline_seconds), (Some(0), Some(270)));
        assert_eq!(spec.ttl_seconds_after_finished, Some(3600));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let psc = pod.security_context.unwrap();
        assert_eq!((psc.run_as_non_root, psc.run_as_user), (Some(true), Some(RUN_AS)));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let volume = pod.volumes.unwrap()[0].persistent_volume_claim.clone().unwrap();
        assert_eq!((volume.claim_name.as_str(), volume.read_only), ("patients-audit", Some(true)));
        let c = &pod.containers[0];
        assert_eq!(
            c.args.clone().unwrap(),
            [
                "audit",
                "verify",
                "--dir=/audit/trail",
                "--public-key-base64=MCowBQYDK2VwAyEA",
                "--summary=/dev/termination-log"
            ]
        );
        assert_eq!(c.volume_mounts.as_ref().unwrap()[0].read_only, Some(true));
        let sc = c.security_context.clone().unwrap();
        assert_eq!(
            (sc.allow_privilege_escalation, sc.read_only_root_filesystem, sc.run_as_non_root),
            (Some(false), Some(true), Some(true))
        );
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(c.termination_message_policy.as_deref(), Some("File"));
        assert!(c.resources.as_ref().unwrap().limits.as_ref().unwrap().contains_key("memory"));
        assert!(c.env.is_none() && c.env_from.is_none(), "no credentials, no key material");
        let affinity = pod.affinity.unwrap().pod_affinity.unwrap();
        let term = &affinity.preferred_during_scheduling_ignored_during_execution.unwrap()[0].pod_affinity_term;
        assert_eq!(term.topology_key, "kubernetes.io/hostname");
        let rendered = serde_json::to_string(&job).unwrap();
        assert!(!rendered.contains("audit-key") && !rendered.contains("signing-key"), "{rendered}");
    }

    #[test]
    fn only_the_built_job_counts() {
        let audit = audit();
        let built = job(&audit);
        assert!(is_built(&built, &built));
        let edited = |edit: &dyn Fn(&mut Job)| {
            let mut j = built.clone();
            edit(&mut j);
            is_built(&j, &built)
        };
        fn pod(j: &mut Job) -> &mut PodSpec {
            j.spec.as_mut().unwrap().template.spec.as_mut().unwrap()
        }
        assert!(!edited(&|j| j.metadata.owner_references = None), "no owner");
        assert!(!edited(&|j| j.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into()), "another owner");
        assert!(!edited(&|j| pod(j).containers[0].image = Some("evil:1".into())), "another image");
        let mut upgraded = built.clone();
        pod(&mut upgraded).containers[0].image = Some("fhir-operator:2".into());
        assert!(same_owner(&upgraded, &built), "the endpoint's, from another image: replaced, not believed");
        upgraded.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into();
        assert!(!same_owner(&upgraded, &built));
        assert!(!edited(&|j| pod(j).containers[0].args = Some(vec!["sh".into()])), "other arguments");
        assert!(!edited(&|j| {
            pod(j).containers[0].args.as_mut().unwrap()[3] = "--public-key-base64=AAAA".into();
        }));
        assert!(!edited(&|j| pod(j).volumes.as_mut().unwrap()[0]
            .persistent_volume_claim
            .as_mut()
            .unwrap()
            .read_only = Some(false)));
        assert!(!edited(&|j| {
            let c = pod(j).containers[0].clone();
            pod(j).containers.push(Container { name: "other".into(), ..c });
        }));
    }

    fn finished(job: &Job, type_: &str) -> Job {
        let mut j = job.clone();
        j.metadata.uid = Some("job-uid".into());
        j.status = Some(
            serde_json::from_value(serde_json::json!({
                "completionTime": "2026-01-01T00:05:20Z",
                "conditions": [{"type": type_, "status": "True", "reason": "BackoffLimitExceeded"}]
            }))
            .unwrap(),
        );
        j
    }

    fn pod_of(owner_uid: &str, image: &str, exit: i32, message: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": owner_uid, "controller": true}]},
            "spec": {"containers": [{"name": "verify", "image": image}]},
            "status": {"containerStatuses": [{"name": "verify", "ready": false, "restartCount": 0, "image": image,
                "imageID": "", "state": {"terminated": {"exitCode": exit, "message": message,
                "finishedAt": "2026-01-01T00:05:19Z"}}}]}
        }))
        .unwrap()
    }

    #[test]
    fn results_come_only_from_a_finished_job_and_its_own_pod() {
        let now: Timestamp = "2026-01-01T00:06:00Z".parse().unwrap();
        let audit = audit();
        let built = job(&audit);
        assert_eq!(result_of(&built, &[], now), JobResult::Running);
        let verified = r#"{"version":1,"result":"verified","streams":1,"checkpoints":4,"records":50,
            "lastCheckpoint":"2026-01-01T00:05:00Z","problem":null,"error":null}"#;
        let complete = finished(&built, "Complete");
        let at: Timestamp = "2026-01-01T00:05:19Z".parse().unwrap();
        assert_eq!(
            result_of(&complete, &[pod_of("job-uid", "fhir-operator:1", 0, Some(verified))], now),
            JobResult::Finished {
                at,
                verification: Verification::Verified {
                    last_seal: Some("2026-01-01T00:05:00Z".parse().unwrap()),
                    records: 50,
                    streams: 1,
                    problem: None
                }
            }
        );
        let unreadable = |pods: &[Pod], job: &Job| match result_of(job, pods, now) {
            JobResult::Finished { verification: Verification::Unreadable(why), .. } => why,
            other => panic!("{other:?}"),
        };
        // Not evidence: another pod's message, another image, no message,
        // a nonzero exit, a Job that failed, a message that does not parse.
        assert!(
            unreadable(&[pod_of("other-uid", "fhir-operator:1", 0, Some(verified))], &complete).contains("no result")
        );
        assert!(unreadable(&[pod_of("job-uid", "evil:1", 0, Some(verified))], &complete).contains("no result"));
        assert!(unreadable(&[pod_of("job-uid", "fhir-operator:1", 0, None)], &complete).contains("without a result"));
        assert!(
            unreadable(&[pod_of("job-uid", "fhir-operator:1", 1, Some(verified))], &complete).contains("not evidence")
        );
        let failed = finished(&built, "Failed");
        assert!(
            unreadable(&[pod_of("job-uid", "fhir-operator:1", 0, Some(verified))], &failed).contains("not evidence")
        );
        assert!(unreadable(&[], &failed).contains("BackoffLimitExceeded"));
        assert!(
            unreadable(&[pod_of("job-uid", "fhir-operator:1", 0, Some("all good"))], &complete).contains("refused")
        );
        let broken = r#"{"version":1,"result":"broken","streams":1,"checkpoints":4,"records":50,
            "lastCheckpoint":"2026-01-01T00:05:00Z","problem":{"stream":"patients-0","checkpoint":2,
            "segment":"segments/x-00000000000000000011.jsonl","seq":13,"message":"record seq 13 was altered"},
            "error":null}"#;
        match result_of(&failed, &[pod_of("job-uid", "fhir-operator:1", 1, Some(broken))], now) {
            JobResult::Finished { verification: Verification::Verified { problem: Some(p), .. }, .. } => assert_eq!(
                p,
                "stream patients-0: checkpoint 2, segment segments/x-00000000000000000011.jsonl, record seq 13: \
                 record seq 13 was altered"
            ),
            other => panic!("{other:?}"),
        }
    }
}
