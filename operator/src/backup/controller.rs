//! The BackupPolicy controller: checks the policy and what it names, reads
//! its Jobs (and, for finished ones, their pods' termination messages),
//! asks [`plan::plan`] what to do, creates the slot's Job, writes the
//! status, deletes Jobs beyond the kept history, and publishes one event per
//! step.
//!
//! Order matters for "never twice, never lost": the Job is created before
//! the status records its slot (a crash in between recreates the same name,
//! which the API server refuses as existing), and a Job is deleted only
//! after the status holds its result.

use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::{info, instrument, warn};

use super::job::{self as jobs, AGENT_CONTAINER, JobImages, JobInputs, POLICY_LABEL, RUN_LABEL, VERIFY_CONTAINER};
use super::manifest::Report;
use super::plan::{self, JobState, JobView, Observed, RunKind, Settings, Step};
use crate::api::{
    BackupOutcome, BackupPolicy, BackupPolicyStatus, FhirEndpoint, KeyAlgorithm, KeyRotationSchedule, condition, reason,
};
use crate::apply::{NoSharedBackoff, api, apply_status, drive, publish_event};
use crate::caches::Caches;
use crate::conditions::{self, Clock, Desired};
use crate::fhirendpoint::validate::InvalidSpec;
use crate::health::Watches;
use crate::jobs::finished;
use crate::keyrotation::schedule;
use crate::keyrotation::secret::secret_name;
use crate::meta::owner_ref;
use crate::metrics::{BackupLabels, RunLabels, SharedMetrics};

pub const FIELD_MANAGER: &str = "fhir-operator/backuppolicy";
pub const CONTROLLER: &str = "backuppolicy";
/// The condition on the last finished backup.
pub const LAST_BACKUP_SUCCEEDED: &str = "LastBackupSucceeded";

/// Reasons of this controller's conditions.
pub mod reasons {
    pub const SCHEDULED: &str = "Scheduled";
    pub const SUSPENDED: &str = "Suspended";
    pub const ENDPOINT_NOT_FOUND: &str = "EndpointNotFound";
    pub const EMBEDDED_DATABASE: &str = "EmbeddedDatabase";
    pub const KEY_SCHEDULE_NOT_FOUND: &str = "KeyScheduleNotFound";
    pub const WRONG_KEY_ALGORITHM: &str = "WrongKeyAlgorithm";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
}

/// Shared by every reconcile of one scope.
pub struct Context {
    pub client: Client,
    pub jobs: Store<Job>,
    pub endpoints: Store<FhirEndpoint>,
    pub schedules: Store<KeyRotationSchedule>,
    pub clock: Arc<dyn Clock>,
    pub metrics: SharedMetrics,
    pub recorder: Recorder,
    pub images: JobImages,
}

/// Error messages name objects, never key material or credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating Job {name}: {source}")]
    CreateJob { name: String, source: kube::Error },
    #[error("deleting Job {name}: {source}")]
    DeleteJob { name: String, source: kube::Error },
    #[error("reading the pods of Job {name}: {source}")]
    Pods { name: String, source: kube::Error },
    #[error("writing status: {0}")]
    Status(kube::Error),
}

impl Error {
    fn category(&self) -> &'static str {
        match self {
            Error::CreateJob { .. } | Error::DeleteJob { .. } => "apply",
            Error::Pods { .. } => "dereference",
            Error::Status(_) => "status",
        }
    }
}

fn error_policy(policy: Arc<BackupPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.category());
    warn!(namespace = policy.namespace().unwrap_or_default(), name = policy.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[instrument(skip_all, fields(kind = "BackupPolicy", namespace = %policy.namespace().unwrap_or_default(), name = %policy.name_any(), generation = policy.metadata.generation.unwrap_or_default()))]
async fn reconcile(policy: Arc<BackupPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = run(&policy, &ctx).await;
    ctx.metrics.observe(CONTROLLER, started.elapsed());
    result
}

/// What the policy names, checked.
struct Resolved {
    settings: Settings,
    database: crate::fhirendpoint::validate::Database,
    key_secret: String,
}

fn resolve(policy: &BackupPolicy, ctx: &Context) -> Result<Resolved, (&'static str, InvalidSpec)> {
    let ns = policy.namespace().unwrap_or_default();
    let settings = plan::settings(&policy.spec).map_err(|e| (reason::INVALID_SPEC, e))?;
    let invalid = |field: &str, message: String| InvalidSpec { field: field.into(), message };
    let endpoint = ctx.endpoints.get(&ObjectRef::new(&policy.spec.endpoint).within(&ns)).ok_or_else(|| {
        (
            reasons::ENDPOINT_NOT_FOUND,
            invalid(
                "spec.endpoint",
                format!("FhirEndpoint {:?} does not exist in namespace {ns}", policy.spec.endpoint),
            ),
        )
    })?;
    let database = endpoint.spec.database.as_ref().ok_or_else(|| {
        (
            reasons::EMBEDDED_DATABASE,
            invalid(
                "spec.endpoint",
                format!(
                    "FhirEndpoint {:?} uses its embedded database (no spec.database): there is no PostgreSQL to back up",
                    policy.spec.endpoint
                ),
            ),
        )
    })?;
    // The endpoint's controller refuses the same fields; nothing of a
    // refused database reaches a Job's environment.
    let database = crate::fhirendpoint::validate::check_database(database).map_err(|e| {
        (
            reason::INVALID_SPEC,
            invalid("spec.endpoint", format!("FhirEndpoint {:?} has an invalid database: {e}", policy.spec.endpoint)),
        )
    })?;
    let key_schedule = &policy.spec.encryption.key_schedule;
    let krs = ctx.schedules.get(&ObjectRef::new(key_schedule).within(&ns)).ok_or_else(|| {
        (
            reasons::KEY_SCHEDULE_NOT_FOUND,
            invalid(
                "spec.encryption.keySchedule",
                format!("KeyRotationSchedule {key_schedule:?} does not exist in namespace {ns}"),
            ),
        )
    })?;
    if krs.spec.algorithm != KeyAlgorithm::Aes256 {
        return Err((
            reasons::WRONG_KEY_ALGORITHM,
            invalid(
                "spec.encryption.keySchedule",
                format!(
                    "KeyRotationSchedule {key_schedule:?} has algorithm {}; backups need one of algorithm aes-256",
                    crate::keyrotation::keys::algorithm_name(krs.spec.algorithm)
                ),
            ),
        ));
    }
    Ok(Resolved { settings, database, key_secret: secret_name(&krs) })
}

async fn run(policy: &BackupPolicy, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let name = policy.name_any();
    let ns = policy.namespace().unwrap_or_default();
    let resolved = match resolve(policy, ctx) {
        Ok(resolved) => resolved,
        Err((why, invalid)) => return refuse(policy, ctx, why, invalid, now).await,
    };

    let views = job_views(policy, ctx).await?;
    let status = policy.status.clone().unwrap_or_default();
    let anchor = policy.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let observed = Observed {
        policy: &name,
        status: &status,
        jobs: &views,
        request: policy.annotations().get(plan::BACKUP_NOW_ANNOTATION).map(String::as_str),
        anchor,
        now,
    };
    let plan = plan::plan(&resolved.settings, &observed);

    // The Jobs first: a status never records a slot whose Job does not exist.
    let job_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let inputs = JobInputs {
        policy,
        namespace: &ns,
        owner: owner_ref(policy),
        database: &resolved.database,
        key_secret: &resolved.key_secret,
        images: &ctx.images,
    };
    for new in &plan.create {
        match job_api.create(&PostParams::default(), &jobs::build(new, &inputs)).await {
            Ok(_) => info!(job = %new.name, kind = new.kind.label(), slot = %new.slot, "Job created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                info!(job = %new.name, "Job exists already: this slot is running")
            }
            Err(source) => return Err(Error::CreateJob { name: new.name.clone(), source }),
        }
    }

    let mut next = plan.status.clone();
    next.observed_generation = policy.metadata.generation;
    next.conditions = status.conditions.clone();
    for desired in desired_conditions(&resolved.settings, &next) {
        conditions::set(&mut next.conditions, desired, policy.metadata.generation, now);
    }
    write_status(policy, ctx, next.clone()).await?;
    export_metrics(policy, ctx, &resolved.settings, &next, now);

    for job in &plan.delete {
        let params = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
        match job_api.delete(job, &params).await {
            Ok(_) => info!(job, "finished Job deleted; its result is in status"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(Error::DeleteJob { name: job.clone(), source }),
        }
    }
    for step in &plan.steps {
        let type_ = if step.is_warning() { EventType::Warning } else { EventType::Normal };
        info!(step = step.reason(), "{step}");
        count(ctx, step);
        publish(ctx, policy, type_, step.reason(), step.to_string()).await;
    }
    Ok(match plan.wake_at {
        Some(at) => Action::requeue(ctx.clock.real_wait(schedule::wait_until(now, at))),
        None => Action::await_change(),
    })
}

fn count(ctx: &Context, step: &Step) {
    let (kind, outcome) = match step {
        Step::BackupSucceeded(_) => ("backup", "succeeded"),
        Step::BackupFailed(_) => ("backup", "failed"),
        Step::RestoreVerified(_) => ("restore-drill", "succeeded"),
        Step::RestoreFailed { .. } => ("restore-drill", "failed"),
        Step::DrillSkipped { .. } => ("restore-drill", "skipped"),
        Step::Started(job) => (job.kind.label(), "started"),
    };
    ctx.metrics.backup_runs.get_or_create(&RunLabels { kind, outcome }).inc();
}

/// The policy's Jobs from the cache; finished ones with their result read
/// from their pods' termination messages.
async fn job_views(policy: &BackupPolicy, ctx: &Context) -> Result<Vec<JobView>, Error> {
    let (name, ns) = (policy.name_any(), policy.namespace());
    let owned: Vec<Arc<Job>> = ctx
        .jobs
        .state()
        .into_iter()
        .filter(|j| j.namespace() == ns && j.labels().get(POLICY_LABEL) == Some(&name))
        .collect();
    let mut views = Vec::new();
    for job in owned {
        let Some(kind) = job.labels().get(RUN_LABEL).and_then(|l| RunKind::from_label(l)) else { continue };
        let Some(slot) = jobs::slot_of(&job) else { continue };
        let job_name = job.name_any();
        let finished = finished(&job);
        let state = match finished {
            None => JobState::Running,
            // Known already: no need to read its pods again.
            Some((succeeded, ..)) if policy.status.as_ref().is_some_and(|s| plan::is_recorded(s, &job_name)) => {
                JobState::Recorded { succeeded }
            }
            Some((succeeded, at, job_message)) => {
                let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns.as_deref().unwrap_or_default());
                let list = pods
                    .list(&ListParams::default().labels(&format!("job-name={job_name}")))
                    .await
                    .map_err(|source| Error::Pods { name: job_name.clone(), source })?;
                result_of(kind, succeeded, at, job_message, &list.items)
            }
        };
        views.push(JobView { name: job_name, kind, slot, state });
    }
    Ok(views)
}

/// The result of a finished Job from its pods: the report in the agent's
/// termination message, or what the failed container said.
pub fn result_of(kind: RunKind, succeeded: bool, at: Option<Timestamp>, job_message: String, pods: &[Pod]) -> JobState {
    let reporter = match kind {
        RunKind::Backup => AGENT_CONTAINER,
        RunKind::Drill => VERIFY_CONTAINER,
    };
    let statuses = || {
        pods.iter()
            .filter_map(|p| p.status.as_ref())
            .flat_map(|s| s.init_container_statuses.iter().flatten().chain(s.container_statuses.iter().flatten()))
    };
    let failed = |message: String| JobState::Failed { message, finished: at };
    if succeeded {
        let report = statuses()
            .filter(|c| c.name == reporter)
            .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone());
        return match report.as_deref().map(Report::from_message) {
            Some(Ok(Report::Backup(b))) if kind == RunKind::Backup => JobState::BackupSucceeded(b),
            Some(Ok(Report::Drill(d))) if kind == RunKind::Drill => JobState::DrillSucceeded(d),
            Some(Ok(other)) => failed(format!("the Job completed, but container {reporter} reported {other:?}")),
            Some(Err(e)) => failed(format!("the Job completed, but container {reporter}'s report is unreadable: {e}")),
            None => failed(format!("the Job completed without a report from container {reporter}")),
        };
    }
    let said = statuses().find_map(|c| {
        let terminated = c.state.as_ref()?.terminated.as_ref()?;
        if terminated.exit_code == 0 {
            return None;
        }
        let message = terminated.message.as_deref().map(str::trim).filter(|m| !m.is_empty());
        let text = match message.map(Report::from_message) {
            Some(Ok(Report::Failed { message })) => message,
            _ => message
                .map(str::to_owned)
                .or_else(|| terminated.reason.clone())
                .unwrap_or_else(|| format!("exit code {}", terminated.exit_code)),
        };
        Some(format!("container {}: {text}", c.name))
    });
    failed(said.unwrap_or(if job_message.is_empty() { "the Job failed".into() } else { job_message }))
}

fn desired_conditions(settings: &Settings, next: &BackupPolicyStatus) -> Vec<Desired<'static>> {
    let mut desired = Vec::new();
    desired.push(if settings.suspend {
        Desired::new(condition::READY, true, reasons::SUSPENDED, "backups and restore drills paused (spec.suspend)")
    } else {
        let mut message = match &next.next_schedule_time {
            Some(t) => format!("next backup at {}", t.0),
            None => "no further backup slot".to_owned(),
        };
        if let Some(t) = &next.next_drill_schedule_time {
            message.push_str(&format!("; next restore drill at {}", t.0));
        }
        Desired::new(condition::READY, true, reasons::SCHEDULED, message)
    });
    if let Some(last) = next.history.iter().find(|r| r.outcome != BackupOutcome::Running) {
        desired.push(if last.outcome == BackupOutcome::Succeeded {
            Desired::new(
                LAST_BACKUP_SUCCEEDED,
                true,
                reasons::SUCCEEDED,
                format!(
                    "{} completed: {} bytes, key version {}",
                    last.job,
                    last.size_bytes.unwrap_or_default(),
                    last.key_version.unwrap_or_default()
                ),
            )
        } else {
            Desired::new(
                LAST_BACKUP_SUCCEEDED,
                false,
                reasons::FAILED,
                format!("{} failed: {}", last.job, last.message.as_deref().unwrap_or("no message")),
            )
        });
    }
    desired
}

/// Timestamps of the last good backup and restore, and how old each may
/// get, for the endpoint's PrometheusRule.
fn export_metrics(
    policy: &BackupPolicy,
    ctx: &Context,
    settings: &Settings,
    status: &BackupPolicyStatus,
    now: Timestamp,
) {
    let labels = BackupLabels {
        policy_namespace: policy.namespace().unwrap_or_default(),
        policy: policy.name_any(),
        fhir_endpoint: policy.spec.endpoint.clone(),
    };
    let seconds = |t: Timestamp| t.as_millisecond() as f64 / 1000.0;
    if let Some(last) = &status.last_successful_backup {
        let at = last.completion_time.as_ref().unwrap_or(&last.time).0;
        ctx.metrics.backup_last_success.get_or_create(&labels).set(seconds(at));
    }
    if let Some(restore) = &status.last_verified_restore {
        ctx.metrics.restore_last_verified.get_or_create(&labels).set(seconds(restore.time.0));
    }
    let (backup_max, drill_max) = plan::freshness(settings, now);
    ctx.metrics.backup_max_age.get_or_create(&labels).set(backup_max.as_secs_f64());
    if let Some(drill_max) = drill_max {
        ctx.metrics.restore_max_age.get_or_create(&labels).set(drill_max.as_secs_f64());
    }
}

/// A policy that cannot run: Ready=False naming the field; nothing is
/// scheduled (the next times are cleared) until it is fixed.
async fn refuse(
    policy: &BackupPolicy,
    ctx: &Context,
    why: &'static str,
    invalid: InvalidSpec,
    now: Timestamp,
) -> Result<Action, Error> {
    if why == reason::INVALID_SPEC {
        ctx.metrics.invalid_specs.get_or_create(&crate::metrics::ControllerLabels { controller: CONTROLLER }).inc();
    }
    let message = invalid.to_string();
    let mut status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    status.observed_generation = generation;
    status.next_schedule_time = None;
    status.next_drill_schedule_time = None;
    let changed = !status.conditions.iter().any(|c| c.type_ == condition::READY && c.message == message);
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::READY, false, why, message.clone()),
        generation,
        now,
    );
    write_status(policy, ctx, status).await?;
    if changed {
        publish(ctx, policy, EventType::Warning, why, format!("{message}; nothing is scheduled until this is fixed"))
            .await;
    }
    Ok(Action::await_change())
}

async fn write_status(policy: &BackupPolicy, ctx: &Context, status: BackupPolicyStatus) -> Result<(), Error> {
    if policy.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<BackupPolicy> = Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    apply_status(&api, &policy.name_any(), &status, FIELD_MANAGER).await.map_err(Error::Status)
}

async fn publish(ctx: &Context, policy: &BackupPolicy, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Backup".into(), secondary: None };
    publish_event(&ctx.recorder, policy, event).await;
}

/// Runs the controller of one scope (`None`: all namespaces) until
/// `shutdown` completes; `ready` is called once its caches are filled.
#[allow(clippy::too_many_arguments)]
pub fn run_scope(
    client: Client,
    clock: Arc<dyn Clock>,
    metrics: SharedMetrics,
    watches: Watches,
    images: JobImages,
    namespace: Option<String>,
    instance: Option<String>,
    caches: &Caches,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let ns = namespace.as_deref();
    let w = watches.controller(CONTROLLER, ns);
    let (job_cache, job_stream) = caches.children(api::<Job>(&client, ns), &w);
    let (endpoints, endpoint_stream) = caches.related(api::<FhirEndpoint>(&client, ns), &w);
    let (schedules, schedule_stream) = caches.related(api::<KeyRotationSchedule>(&client, ns), &w);
    let (policies, policy_stream) = caches.related(api::<BackupPolicy>(&client, ns), &w);
    let by_endpoint = policies.clone();
    let by_schedule = policies.clone();
    let controller = Controller::for_shared_stream(policy_stream, policies.clone())
        .trigger_backoff(NoSharedBackoff)
        .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)))
        .owns_shared_stream(job_stream)
        .watches_shared_stream(endpoint_stream, move |ep: Arc<FhirEndpoint>| {
            let (name, ns) = (ep.name_any(), ep.namespace());
            by_endpoint
                .state()
                .iter()
                .filter(|p| p.namespace() == ns && p.spec.endpoint == name)
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        })
        .watches_shared_stream(schedule_stream, move |krs: Arc<KeyRotationSchedule>| {
            let (name, ns) = (krs.name_any(), krs.namespace());
            by_schedule
                .state()
                .iter()
                .filter(|p| p.namespace() == ns && p.spec.encryption.key_schedule == name)
                .map(|p| ObjectRef::from_obj(&**p))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown);
    let reporter = Reporter { controller: "fhir-operator".into(), instance };
    let context = Arc::new(Context {
        client: client.clone(),
        jobs: job_cache.clone(),
        endpoints: endpoints.clone(),
        schedules: schedules.clone(),
        clock,
        metrics,
        recorder: Recorder::new(client, reporter),
        images,
    });
    let caches_filled = async move {
        let _ = futures::join!(
            job_cache.wait_until_ready(),
            endpoints.wait_until_ready(),
            schedules.wait_until_ready(),
            policies.wait_until_ready(),
        );
    };
    let run = controller.run(reconcile, error_policy, context);
    async move { drive(run, caches_filled, ready, CONTROLLER, namespace.as_deref()).await }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::manifest::DrillReport;

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": statuses})).unwrap()
    }

    fn terminated(name: &str, code: i32, message: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "message": message}}})
    }

    #[test]
    fn a_drill_reports_through_its_verify_container() {
        let report = Report::Drill(DrillReport {
            backup: "nightly-202611220130".into(),
            duration_seconds: 12.5,
            finished_at: Timestamp::UNIX_EPOCH,
            tables: 6,
            rows: 6253,
        });
        let pods = [pod(serde_json::json!({
            "initContainerStatuses": [terminated("fetch", 0, "{}"), terminated("restore", 0, "")],
            "containerStatuses": [terminated(VERIFY_CONTAINER, 0, &report.to_message())],
        }))];
        match result_of(RunKind::Drill, true, None, String::new(), &pods) {
            JobState::DrillSucceeded(d) => {
                assert_eq!((d.backup.as_str(), d.duration_seconds), ("nightly-202611220130", 12.5))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failure_names_the_container_and_what_it_said() {
        // pg_dump failed: its last log lines are the init container's message.
        let pods = [pod(serde_json::json!({
            "initContainerStatuses": [terminated("dump", 1, "pg_dump: error: connection to server failed")],
        }))];
        let state = result_of(RunKind::Backup, false, None, "BackoffLimitExceeded".into(), &pods);
        assert_eq!(
            state,
            JobState::Failed {
                message: "container dump: pg_dump: error: connection to server failed".into(),
                finished: None
            }
        );
        // The agent's own failure report is unwrapped.
        let failed = Report::Failed { message: "s3 bucket b: writing x: 403".into() };
        let pods =
            [pod(serde_json::json!({"containerStatuses": [terminated(AGENT_CONTAINER, 1, &failed.to_message())]}))];
        let state = result_of(RunKind::Backup, false, None, String::new(), &pods);
        assert_eq!(
            state,
            JobState::Failed { message: "container agent: s3 bucket b: writing x: 403".into(), finished: None }
        );
        // No pod left (deadline exceeded): the Job's own condition.
        let state = result_of(RunKind::Backup, false, None, "DeadlineExceeded: Job was active longer".into(), &[]);
        assert!(matches!(state, JobState::Failed { message, .. } if message.starts_with("DeadlineExceeded")));
        // Completed without a report is not a success.
        let state = result_of(RunKind::Backup, true, None, String::new(), &[]);
        assert!(matches!(state, JobState::Failed { message, .. } if message.contains("without a report")));
    }
}
