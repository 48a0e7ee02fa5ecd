//! The BackupPolicy controller against a real kube-apiserver and
//! kube-controller-manager (whose Job controller makes the pods and finishes
//! the Jobs), run as the real `fhir-operator` binary with exactly its RBAC.
//! There is no kubelet: the test plays it, writing the pods' status with the
//! agent's termination message.

use std::collections::BTreeSet;
use std::time::Duration;

use fhir_operator::api::{BackupOutcome, BackupPolicy};
use fhir_operator::backup::job::{POLICY_LABEL, slot_of};
use fhir_operator::backup::manifest::{BackupReport, Report};
use fhir_operator::backup::plan::{BACKUP_NOW_ANNOTATION, RunKind, job_name, manual_job_name};
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{apply_value, cluster, install_crds, namespace, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const POLICY: &str = "nightly";

async fn setup(prefix: &str, extra: &[&str]) -> (Client, String, Operator) {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let ns = namespace(&client, prefix).await.expect("namespace");
    let operator = Operator::start(cluster.operator_kubeconfig(), extra).expect("operator");
    for object in [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "patients-db"},
               "stringData": {"username": "fhir", "password": "db-password"}}),
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": "patients"},
               "spec": {"database": {"host": "db.example", "name": "fhir", "credentialsSecret": "patients-db"}}}),
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule", "metadata": {"name": "backup-key"},
               "spec": {"algorithm": "aes-256", "interval": "90d", "gracePeriod": "720h"}}),
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule", "metadata": {"name": "api-keys"},
               "spec": {"algorithm": "api-key", "clients": ["a"], "interval": "90d", "gracePeriod": "1h"}}),
    ] {
        apply_value(&client, &ns, &object).await;
    }
    (client, ns, operator)
}

async fn apply_policy(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    let policy = json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "BackupPolicy", "metadata": {"name": name}, "spec": spec});
    apply_value(client, ns, &policy).await;
}

fn pvc_spec(schedule: &str) -> serde_json::Value {
    json!({"endpoint": "patients", "schedule": schedule,
           "destination": {"persistentVolumeClaim": {"claimName": "fhir-backups"}},
           "encryption": {"keySchedule": "backup-key"}})
}

async fn policy_jobs(client: &Client, ns: &str, policy: &str) -> Vec<Job> {
    Api::<Job>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{POLICY_LABEL}={policy}")))
        .await
        .expect("jobs")
        .items
}

async fn policy(client: &Client, ns: &str, name: &str) -> BackupPolicy {
    Api::<BackupPolicy>::namespaced(client.clone(), ns).get(name).await.expect("policy")
}

fn condition(p: &BackupPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_come_at_the_slots_with_derived_names_and_never_twice_across_kill_9() {
    // The backup controller's clock runs 60 times faster: a cron minute is a second.
    let origin = Timestamp::now().to_string();
    let fast = ["--backup-clock-rate=60".to_owned(), format!("--backup-clock-origin={origin}")];
    let args: Vec<&str> = fast.iter().map(String::as_str).collect();
    let (client, ns, mut operator) = setup("backup-slots", &args).await;
    apply_policy(&client, &ns, POLICY, pvc_spec("* * * * *")).await;

    let before = wait_for("three backup Jobs", WAIT, || async {
        let jobs = policy_jobs(&client, &ns, POLICY).await;
        Ok((jobs.len() >= 3).then_some(jobs))
    })
    .await
    .unwrap();
    // A Job's name is the policy and its slot: a whole minute.
    for job in &before {
        let slot = slot_of(job).expect("slot annotation");
        assert_eq!(slot.as_second() % 60, 0, "{slot}");
        assert_eq!(job.metadata.name.as_deref(), Some(job_name(POLICY, RunKind::Backup, slot).as_str()));
    }
    // The Job as built: pg_dump, then the agent; keys from the schedule's Secret; PSS restricted.
    let pod = before[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.init_containers.as_ref().unwrap()[0].name, "dump");
    assert_eq!(pod.containers[0].name, "agent");
    let agent_args = pod.containers[0].args.clone().unwrap_or_default();
    assert!(agent_args.iter().any(|a| a == "--key-schedule=backup-key"), "{agent_args:?}");
    assert!(
        pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("backup-key-keys"))
    );
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    assert_eq!(before[0].spec.as_ref().unwrap().backoff_limit, Some(0));
    assert!(!serde_json::to_string(&before[0]).unwrap().contains("db-password"), "credentials only by reference");

    // kill -9 at a random point, and start again on the same clock.
    operator.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut operator = Operator::start(cluster().operator_kubeconfig(), &args).expect("operator again");
    let after = wait_for("more backup Jobs after the restart", WAIT, || async {
        let jobs = policy_jobs(&client, &ns, POLICY).await;
        Ok((jobs.len() >= before.len() + 3).then_some(jobs))
    })
    .await
    .unwrap();
    let _ = operator.terminate(Duration::from_secs(10));
    // Never twice for a slot: every Job's slot is distinct, and in creation
    // order the slots only move forward (the restart made one catch-up Job,
    // for the latest missed slot, not one per missed slot nor an old slot again).
    let mut jobs = policy_jobs(&client, &ns, POLICY).await;
    assert!(jobs.len() >= after.len());
    jobs.sort_by_key(|j| (j.metadata.creation_timestamp.clone().map(|t| t.0), slot_of(j)));
    let slots: Vec<Timestamp> = jobs.iter().map(|j| slot_of(j).unwrap()).collect();
    assert_eq!(slots.iter().collect::<BTreeSet<_>>().len(), slots.len(), "a slot ran twice: {slots:?}");
    assert!(slots.windows(2).all(|w| w[0] < w[1]), "slots out of order: {slots:?}");
    let status = policy(&client, &ns, POLICY).await.status.unwrap();
    let last = status.last_schedule_time.unwrap().0;
    assert!(slots.contains(&last), "lastScheduleTime {last} has no Job");
    // The status lists the runs, newest first, all running (no kubelet).
    assert!(status.history.iter().all(|r| r.outcome == BackupOutcome::Running));
    assert!(status.history.len() <= 20);
}

/// Plays the kubelet for the Job's pod: the containers terminated, the
/// reporting container with `report` as its termination message.
async fn finish_pod(client: &Client, ns: &str, job: &str, container: &str, exit_code: i32, report: &Report) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod = wait_for(&format!("the pod of Job {job}"), WAIT, || async {
        let list = pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await?;
        Ok(list.items.into_iter().next())
    })
    .await
    .unwrap();
    let now = Timestamp::now().to_string();
    let terminated = |name: &str, code: i32, message: Option<String>| {
        json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
               "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                                         "message": message, "startedAt": now, "finishedAt": now}}})
    };
    let phase = if exit_code == 0 { "Succeeded" } else { "Failed" };
    let init: Vec<String> =
        pod.spec.as_ref().unwrap().init_containers.iter().flatten().map(|c| c.name.clone()).collect();
    let status = json!({"status": {
        "phase": phase,
        "initContainerStatuses": init.iter().map(|n| terminated(n, 0, None)).collect::<Vec<_>>(),
        "containerStatuses": [terminated(container, exit_code, Some(report.to_message()))],
    }});
    pods.patch_status(&pod.metadata.name.unwrap(), &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("pod status");
}

async fn request_backup(client: &Client, ns: &str, policy: &str, value: &str) -> String {
    let patch = json!({"metadata": {"annotations": {BACKUP_NOW_ANNOTATION: value}}});
    Api::<BackupPolicy>::namespaced(client.clone(), ns)
        .patch(policy, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("annotate");
    let name = manual_job_name(policy, value);
    wait_for(&format!("Job {name}"), WAIT, || async {
        Ok(policy_jobs(client, ns, policy)
            .await
            .into_iter()
            .find(|j| j.metadata.name.as_deref() == Some(name.as_str())))
    })
    .await
    .unwrap();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_reach_status_events_and_metrics() {
    let (client, ns, operator) = setup("backup-results", &[]).await;
    let mut spec = pvc_spec("0 3 1 1 *");
    spec["restoreDrill"] = json!({"schedule": "0 4 1 1 *"});
    apply_policy(&client, &ns, POLICY, spec).await;
    wait_for("Ready", WAIT, || async {
        Ok(condition(&policy(&client, &ns, POLICY).await, "Ready").filter(|c| c.0 == "True"))
    })
    .await
    .unwrap();

    // A backup now, completed by the agent.
    let job = request_backup(&client, &ns, POLICY, "ticket-1").await;
    let now = Timestamp::now();
    let report = BackupReport {
        location: "directory /backups: x/nightly/job.dump.age".into(),
        size_bytes: 4242,
        sha256: "ab".repeat(32),
        key_version: 1,
        started_at: now,
        finished_at: now,
        tables: 6,
        rows: 6253,
        pruned: vec![],
    };
    finish_pod(&client, &ns, &job, "agent", 0, &Report::Backup(report)).await;
    let p = wait_for("lastSuccessfulBackup", WAIT, || async {
        let p = policy(&client, &ns, POLICY).await;
        let done = p.status.as_ref().and_then(|s| s.last_successful_backup.as_ref()).is_some_and(|b| b.job == job);
        Ok(done.then_some(p))
    })
    .await
    .unwrap();
    let status = p.status.clone().unwrap();
    let last = status.last_successful_backup.unwrap();
    assert_eq!((last.size_bytes, last.key_version, last.outcome), (Some(4242), Some(1), BackupOutcome::Succeeded));
    assert_eq!(status.history[0].job, job);
    let (state, reason, message) = condition(&p, "LastBackupSucceeded").unwrap();
    assert_eq!((state.as_str(), reason.as_str()), ("True", "Succeeded"), "{message}");
    let metrics = operator.metrics();
    assert!(
        metrics.contains(&format!("fhir_operator_backup_last_success_timestamp_seconds{{policy_namespace=\"{ns}\",policy=\"{POLICY}\",fhir_endpoint=\"patients\"}}")),
        "{metrics}"
    );
    assert!(metrics.contains("fhir_operator_backup_runs_total{kind=\"backup\",outcome=\"succeeded\"} 1"), "{metrics}");

    // A failed one: lastFailedBackup and LastBackupSucceeded=False, the agent's message.
    let failing = request_backup(&client, &ns, POLICY, "ticket-2").await;
    let failure = Report::Failed { message: "s3 bucket fhir-backups: writing x: 403 Forbidden".into() };
    finish_pod(&client, &ns, &failing, "agent", 1, &failure).await;
    let p = wait_for("lastFailedBackup", WAIT, || async {
        let p = policy(&client, &ns, POLICY).await;
        let done = p.status.as_ref().and_then(|s| s.last_failed_backup.as_ref()).is_some_and(|b| b.job == failing);
        Ok(done.then_some(p))
    })
    .await
    .unwrap();
    let failed = p.status.clone().unwrap().last_failed_backup.unwrap();
    assert!(failed.message.as_deref().unwrap_or_default().contains("403 Forbidden"), "{failed:?}");
    let (state, reason, _) = condition(&p, "LastBackupSucceeded").unwrap();
    assert_eq!((state.as_str(), reason.as_str()), ("False", "Failed"));
    assert_eq!(p.status.as_ref().unwrap().last_successful_backup.as_ref().unwrap().job, job, "the good one stays");

    // Events for each run.
    let events: Vec<Event> =
        Api::<Event>::namespaced(client.clone(), &ns).list(&ListParams::default()).await.unwrap().items;
    let reasons: BTreeSet<String> = events
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(POLICY))
        .filter_map(|e| e.reason.clone())
        .collect();
    for expected in ["BackupStarted", "BackupSucceeded", "BackupFailed"] {
        assert!(reasons.contains(expected), "no {expected} event: {reasons:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_crons_are_refused_by_field_and_nothing_is_scheduled() {
    let fast = ["--backup-clock-rate=60".to_owned(), format!("--backup-clock-origin={}", Timestamp::now())];
    let args: Vec<&str> = fast.iter().map(String::as_str).collect();
    let (client, ns, _operator) = setup("backup-invalid", &args).await;
    let mut missing = pvc_spec("* * * * *");
    missing["endpoint"] = json!("nobody");
    apply_policy(&client, &ns, "missing-endpoint", missing).await;
    let mut wrong_key = pvc_spec("* * * * *");
    wrong_key["encryption"] = json!({"keySchedule": "api-keys"});
    apply_policy(&client, &ns, "wrong-key", wrong_key).await;
    apply_policy(&client, &ns, "bad-cron", pvc_spec("61 * * * *")).await;
    apply_policy(&client, &ns, "good", pvc_spec("0 3 * * *")).await;
    for (name, reason, field) in [
        ("missing-endpoint", "EndpointNotFound", "spec.endpoint"),
        ("wrong-key", "WrongKeyAlgorithm", "spec.encryption.keySchedule"),
        ("bad-cron", "InvalidSpec", "spec.schedule"),
    ] {
        let (_, got_reason, message) = wait_for(&format!("{name} refused"), WAIT, || async {
            Ok(condition(&policy(&client, &ns, name).await, "Ready").filter(|c| c.0 == "False"))
        })
        .await
        .unwrap();
        assert_eq!(got_reason, reason, "{name}: {message}");
        assert!(message.starts_with(&format!("{field}: ")), "{name}: {message}");
        assert!(policy(&client, &ns, name).await.status.unwrap().next_schedule_time.is_none());
    }
    wait_for("the good policy Ready", WAIT, || async {
        Ok(condition(&policy(&client, &ns, "good").await, "Ready").filter(|c| c.0 == "True"))
    })
    .await
    .unwrap();
    // Three of the fast clock's minutes pass: the refused policies made no Job.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for name in ["missing-endpoint", "wrong-key", "bad-cron"] {
        assert!(policy_jobs(&client, &ns, name).await.is_empty(), "{name} made a Job");
    }
}
