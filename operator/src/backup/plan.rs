//! What a BackupPolicy should do now, as pure functions of its spec, its
//! status, the Jobs the operator sees and the clock: which Job to create
//! (with a name derived from the policy and the slot, so that a restart, a
//! retry or a second replica can only ever create the same one), which
//! finished runs to record, which Jobs to delete, and when to look again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::api::{BackupOutcome, BackupPolicySpec, BackupPolicyStatus, BackupRecord, RestoreRecord};
use crate::fhirendpoint::validate::InvalidSpec;
use crate::keyrotation::schedule::{self, Cadence};
use crate::meta::sha256_hex;

use super::manifest::{BackupReport, DrillReport};

/// The annotation that asks for a backup now: any value not yet handled
/// (`status.lastHandledBackupRequest`) starts one.
pub const BACKUP_NOW_ANNOTATION: &str = "fhiroperator.io/backup-now";
/// Runs recorded in `status.history`.
pub const HISTORY_LIMIT: usize = 20;
/// Finished Jobs kept per kind, as a CronJob keeps them: the last three
/// that succeeded and the last that failed. Older ones are deleted once
/// their result is in status.
pub const SUCCEEDED_JOBS_KEPT: usize = 3;
pub const FAILED_JOBS_KEPT: usize = 1;
/// A run recorded as running whose Job has been gone this long is failed:
/// deleted by hand, or by a TTL while the operator was down.
pub const LOST_JOB_AFTER: SignedDuration = SignedDuration::from_secs(300);
/// Kubernetes object names that also become label values (`job-name`).
const MAX_JOB_NAME: usize = 63;

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub backup: Cadence,
    pub drill: Option<Cadence>,
    pub keep_last: usize,
    pub max_age: Option<SignedDuration>,
    pub suspend: bool,
}

/// Checks what the CRD schema cannot: the cron expressions and the
/// retention's duration. Errors name the field.
pub fn settings(spec: &BackupPolicySpec) -> Result<Settings, InvalidSpec> {
    let backup = schedule::cadence(Some(&spec.schedule), None, "spec")?;
    let drill = match &spec.restore_drill {
        Some(d) => Some(schedule::cadence(Some(&d.schedule), None, "spec.restoreDrill")?),
        None => None,
    };
    let keep_last = usize::try_from(spec.retention.keep_last).ok().filter(|n| *n >= 1).ok_or_else(|| InvalidSpec {
        field: "spec.retention.keepLast".into(),
        message: format!("{} must be at least 1: the newest backup is always kept", spec.retention.keep_last),
    })?;
    let max_age = match &spec.retention.max_age {
        Some(text) => Some(schedule::parse_duration(text).ok_or_else(|| InvalidSpec {
            field: "spec.retention.maxAge".into(),
            message: format!("{text:?} is not a positive duration such as 30d or 12h"),
        })?),
        None => None,
    };
    if let Some(pvc) = &spec.destination.persistent_volume_claim
        && pvc.path.split('/').any(|part| part == "..")
    {
        return Err(InvalidSpec {
            field: "spec.destination.persistentVolumeClaim.path".into(),
            message: format!("{:?} must stay inside the volume: no \"..\" segments", pvc.path),
        });
    }
    Ok(Settings { backup, drill, keep_last, max_age, suspend: spec.suspend })
}

/// What a Job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Backup,
    Drill,
}

impl RunKind {
    pub fn label(self) -> &'static str {
        match self {
            RunKind::Backup => "backup",
            RunKind::Drill => "restore-drill",
        }
    }

    pub fn from_label(label: &str) -> Option<Self> {
        match label {
            "backup" => Some(RunKind::Backup),
            "restore-drill" => Some(RunKind::Drill),
            _ => None,
        }
    }
}

/// The Job of a scheduled slot: `<policy>-<YYYYMMDDHHMM>` for a backup,
/// `<policy>-drill-<YYYYMMDDHHMM>` for a restore drill (UTC). Cron slots
/// fall on whole minutes, so the name is unique per slot.
pub fn job_name(policy: &str, kind: RunKind, slot: Timestamp) -> String {
    let stamp = slot.strftime("%Y%m%d%H%M").to_string();
    let suffix = match kind {
        RunKind::Backup => stamp,
        RunKind::Drill => format!("drill-{stamp}"),
    };
    bounded(policy, &suffix)
}

/// The Job of a "backup now" request: `<policy>-now-<8 hex digits of the
/// annotation's value>`.
pub fn manual_job_name(policy: &str, request: &str) -> String {
    bounded(policy, &format!("now-{}", &sha256_hex(request.as_bytes())[..8]))
}

/// `<policy>-<suffix>`, shortened to 63 characters with a hash of the full
/// policy name when needed, so that two long names never collide.
fn bounded(policy: &str, suffix: &str) -> String {
    let full = format!("{policy}-{suffix}");
    if full.len() <= MAX_JOB_NAME {
        return full;
    }
    let hash = &sha256_hex(policy.as_bytes())[..8];
    let room = MAX_JOB_NAME - suffix.len() - hash.len() - 2;
    let head = policy[..room].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    format!("{head}-{hash}-{suffix}")
}

/// The state of one of the policy's Jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Running,
    BackupSucceeded(BackupReport),
    DrillSucceeded(DrillReport),
    Failed {
        message: String,
        finished: Option<Timestamp>,
    },
    /// Finished, and its result already in status (not read again).
    Recorded {
        succeeded: bool,
    },
}

/// One Job as the controller sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub name: String,
    pub kind: RunKind,
    /// The slot (or request time) it runs for.
    pub slot: Timestamp,
    pub state: JobState,
}

/// Everything [`plan`] looks at.
#[derive(Debug)]
pub struct Observed<'a> {
    pub policy: &'a str,
    pub status: &'a BackupPolicyStatus,
    pub jobs: &'a [JobView],
    /// The value of the backup-now annotation.
    pub request: Option<&'a str>,
    /// When the policy was created: the first slot is after it.
    pub anchor: Timestamp,
    pub now: Timestamp,
}

/// A Job to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub name: String,
    pub kind: RunKind,
    pub slot: Timestamp,
}

/// Something worth an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Started(NewJob),
    BackupSucceeded(BackupRecord),
    BackupFailed(BackupRecord),
    RestoreVerified(RestoreRecord),
    RestoreFailed { job: String, message: String },
    DrillSkipped { slot: Timestamp },
}

impl Step {
    pub fn reason(&self) -> &'static str {
        match self {
            Step::Started(job) if job.kind == RunKind::Drill => "RestoreDrillStarted",
            Step::Started(_) => "BackupStarted",
            Step::BackupSucceeded(_) => "BackupSucceeded",
            Step::BackupFailed(_) => "BackupFailed",
            Step::RestoreVerified(_) => "RestoreVerified",
            Step::RestoreFailed { .. } => "RestoreFailed",
            Step::DrillSkipped { .. } => "RestoreDrillSkipped",
        }
    }

    pub fn is_warning(&self) -> bool {
        matches!(self, Step::BackupFailed(_) | Step::RestoreFailed { .. } | Step::DrillSkipped { .. })
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Started(job) if job.kind == RunKind::Drill => {
                write!(f, "Job {} restores the latest backup for the drill of {}", job.name, job.slot)
            }
            Step::Started(job) => write!(f, "Job {} backs up the slot {}", job.name, job.slot),
            Step::BackupSucceeded(r) => write!(
                f,
                "backup {} written: {} bytes, sha256 {}, key version {}",
                r.location.as_deref().unwrap_or("?"),
                r.size_bytes.unwrap_or_default(),
                r.sha256.as_deref().unwrap_or("?"),
                r.key_version.unwrap_or_default()
            ),
            Step::BackupFailed(r) => {
                write!(f, "Job {} failed: {}", r.job, r.message.as_deref().unwrap_or("no message"))
            }
            Step::RestoreVerified(r) => {
                write!(f, "backup {} restored and verified in {:.1} s (Job {})", r.backup, r.duration_seconds, r.job)
            }
            Step::RestoreFailed { job, message } => write!(f, "restore drill Job {job} failed: {message}"),
            Step::DrillSkipped { slot } => {
                write!(f, "restore drill of {slot} skipped: no successful backup to restore yet")
            }
        }
    }
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub status: BackupPolicyStatus,
    pub create: Vec<NewJob>,
    /// Finished Jobs whose result is recorded in `status` and that fall out
    /// of the kept history: delete them after `status` is written.
    pub delete: Vec<String>,
    pub steps: Vec<Step>,
    pub wake_at: Option<Timestamp>,
}

/// The next status, Jobs to create and delete, and when to look again.
pub fn plan(settings: &Settings, observed: &Observed<'_>) -> Plan {
    let now = observed.now;
    let mut status = observed.status.clone();
    let mut steps = Vec::new();
    record_finished(&mut status, observed, &mut steps);

    let mut create = Vec::new();
    if !settings.suspend {
        let last = status.last_schedule_time.as_ref().map(|t| t.0);
        if let Some(slot) = settings.backup.due_slot(last, observed.anchor, now) {
            create.push(NewJob { name: job_name(observed.policy, RunKind::Backup, slot), kind: RunKind::Backup, slot });
            status.last_schedule_time = Some(Time(slot));
        }
        if let Some(request) = observed.request
            && status.last_handled_backup_request.as_deref() != Some(request)
        {
            let name = manual_job_name(observed.policy, request);
            if !create.iter().any(|j| j.name == name) {
                create.push(NewJob { name, kind: RunKind::Backup, slot: now });
            }
            status.last_handled_backup_request = Some(request.to_owned());
        }
        if let Some(drill) = &settings.drill {
            let last = status.last_drill_schedule_time.as_ref().map(|t| t.0);
            if let Some(slot) = drill.due_slot(last, observed.anchor, now) {
                status.last_drill_schedule_time = Some(Time(slot));
                if status.last_successful_backup.is_some() {
                    create.push(NewJob {
                        name: job_name(observed.policy, RunKind::Drill, slot),
                        kind: RunKind::Drill,
                        slot,
                    });
                } else {
                    steps.push(Step::DrillSkipped { slot });
                }
            }
        }
    }
    for job in &create {
        if job.kind == RunKind::Backup && !observed.jobs.iter().any(|j| j.name == job.name) {
            push_history(&mut status, running_record(job));
        }
        steps.push(Step::Started(job.clone()));
    }

    status.next_schedule_time =
        (!settings.suspend).then(|| settings.backup.next_after(now, observed.anchor)).flatten().map(Time);
    status.next_drill_schedule_time = (!settings.suspend)
        .then(|| settings.drill.as_ref().and_then(|d| d.next_after(now, observed.anchor)))
        .flatten()
        .map(Time);
    let delete = jobs_to_delete(&status, observed.jobs);
    let mut wake_at = [status.next_schedule_time.as_ref(), status.next_drill_schedule_time.as_ref()]
        .into_iter()
        .flatten()
        .map(|t| t.0)
        .min();
    // A running record without its Job is looked at again once it counts as lost.
    for record in status.history.iter().filter(|r| r.outcome == BackupOutcome::Running) {
        let gone = !observed.jobs.iter().any(|j| j.name == record.job) && !create.iter().any(|j| j.name == record.job);
        if gone {
            let at = record.time.0.checked_add(LOST_JOB_AFTER).unwrap_or(Timestamp::MAX);
            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
        }
    }
    Plan { status, create, delete, steps, wake_at }
}

fn running_record(job: &NewJob) -> BackupRecord {
    BackupRecord {
        job: job.name.clone(),
        time: Time(job.slot),
        completion_time: None,
        outcome: BackupOutcome::Running,
        location: None,
        size_bytes: None,
        sha256: None,
        key_version: None,
        message: None,
    }
}

/// Folds finished Jobs not yet recorded into the status, and fails running
/// records whose Job is gone.
fn record_finished(status: &mut BackupPolicyStatus, observed: &Observed<'_>, steps: &mut Vec<Step>) {
    let mut jobs: Vec<&JobView> = observed.jobs.iter().collect();
    jobs.sort_by_key(|j| (j.slot, j.name.clone()));
    for job in jobs {
        match job.kind {
            RunKind::Backup => record_backup(status, job, steps),
            RunKind::Drill => record_drill(status, job, steps),
        }
    }
    for record in status.history.iter_mut() {
        let lost = record.outcome == BackupOutcome::Running
            && !observed.jobs.iter().any(|j| j.name == record.job)
            && record.time.0.checked_add(LOST_JOB_AFTER).is_ok_and(|t| t <= observed.now);
        if lost {
            record.outcome = BackupOutcome::Failed;
            record.message =
                Some("the Job was deleted before the operator read its result; nothing is known of this run".into());
            steps.push(Step::BackupFailed(record.clone()));
            if status.last_failed_backup.as_ref().is_none_or(|f| f.time.0 <= record.time.0) {
                status.last_failed_backup = Some(record.clone());
            }
        }
    }
}

fn record_backup(status: &mut BackupPolicyStatus, job: &JobView, steps: &mut Vec<Step>) {
    let known = status.history.iter().find(|r| r.job == job.name);
    let finished = match &job.state {
        JobState::Running => {
            if known.is_none() {
                push_history(
                    status,
                    running_record(&NewJob { name: job.name.clone(), kind: job.kind, slot: job.slot }),
                );
            }
            return;
        }
        _ if known.is_some_and(|r| r.outcome != BackupOutcome::Running) => return,
        JobState::BackupSucceeded(report) => BackupRecord {
            job: job.name.clone(),
            time: Time(job.slot),
            completion_time: Some(Time(report.finished_at)),
            outcome: BackupOutcome::Succeeded,
            location: Some(report.location.clone()),
            size_bytes: Some(report.size_bytes),
            sha256: Some(report.sha256.clone()),
            key_version: Some(report.key_version),
            message: None,
        },
        JobState::Failed { message, finished } => BackupRecord {
            job: job.name.clone(),
            time: Time(job.slot),
            completion_time: finished.map(Time),
            outcome: BackupOutcome::Failed,
            location: None,
            size_bytes: None,
            sha256: None,
            key_version: None,
            message: Some(message.clone()),
        },
        JobState::DrillSucceeded(_) | JobState::Recorded { .. } => return,
    };
    // Only a record that is the newest of its outcome moves lastSuccessful / lastFailed.
    if finished.outcome == BackupOutcome::Succeeded {
        if status.last_successful_backup.as_ref().is_none_or(|r| r.time.0 <= finished.time.0) {
            status.last_successful_backup = Some(finished.clone());
        }
        steps.push(Step::BackupSucceeded(finished.clone()));
    } else {
        if status.last_failed_backup.as_ref().is_none_or(|r| r.time.0 <= finished.time.0) {
            status.last_failed_backup = Some(finished.clone());
        }
        steps.push(Step::BackupFailed(finished.clone()));
    }
    match status.history.iter_mut().find(|r| r.job == job.name) {
        Some(slot) => *slot = finished,
        None => push_history(status, finished),
    }
}

/// Whether `status` holds the final result of the Job named `job`.
pub fn is_recorded(status: &BackupPolicyStatus, job: &str) -> bool {
    let backup = |r: &Option<BackupRecord>| r.as_ref().is_some_and(|r| r.job == job);
    status.history.iter().any(|r| r.job == job && r.outcome != BackupOutcome::Running)
        || backup(&status.last_successful_backup)
        || backup(&status.last_failed_backup)
        || status.last_verified_restore.as_ref().is_some_and(|r| r.job == job)
        || status.last_failed_restore.as_ref().is_some_and(|r| r.job == job)
}

fn record_drill(status: &mut BackupPolicyStatus, job: &JobView, steps: &mut Vec<Step>) {
    if is_recorded(status, &job.name) {
        return;
    }
    match &job.state {
        JobState::DrillSucceeded(report) => {
            let record = RestoreRecord {
                time: Time(report.finished_at),
                backup: report.backup.clone(),
                duration_seconds: report.duration_seconds,
                job: job.name.clone(),
            };
            if status.last_verified_restore.as_ref().is_none_or(|r| r.time.0 <= record.time.0) {
                status.last_verified_restore = Some(record.clone());
            }
            steps.push(Step::RestoreVerified(record));
        }
        JobState::Failed { message, finished } => {
            let record = crate::api::FailedRestore {
                job: job.name.clone(),
                time: Time(finished.unwrap_or(job.slot)),
                message: message.clone(),
            };
            status.last_failed_restore = Some(record);
            steps.push(Step::RestoreFailed { job: job.name.clone(), message: message.clone() });
        }
        JobState::Running | JobState::BackupSucceeded(_) | JobState::Recorded { .. } => {}
    }
}

/// Newest first, at most [`HISTORY_LIMIT`], ordered by slot.
fn push_history(status: &mut BackupPolicyStatus, record: BackupRecord) {
    status.history.push(record);
    status.history.sort_by(|a, b| b.time.0.cmp(&a.time.0).then_with(|| b.job.cmp(&a.job)));
    status.history.truncate(HISTORY_LIMIT);
}

/// Finished Jobs beyond the kept ones, whose result `status` holds.
fn jobs_to_delete(status: &BackupPolicyStatus, jobs: &[JobView]) -> Vec<String> {
    let mut finished: Vec<&JobView> = jobs.iter().filter(|j| j.state != JobState::Running).collect();
    finished.sort_by(|a, b| b.slot.cmp(&a.slot).then_with(|| b.name.cmp(&a.name)));
    let mut delete = Vec::new();
    for kind in [RunKind::Backup, RunKind::Drill] {
        let (mut succeeded, mut failed) = (0, 0);
        for job in finished.iter().filter(|j| j.kind == kind) {
            let keep = if matches!(job.state, JobState::Failed { .. } | JobState::Recorded { succeeded: false }) {
                failed += 1;
                failed <= FAILED_JOBS_KEPT
            } else {
                succeeded += 1;
                succeeded <= SUCCEEDED_JOBS_KEPT
            };
            if !keep && (matches!(job.state, JobState::Recorded { .. }) || is_recorded(status, &job.name)) {
                delete.push(job.name.clone());
            }
        }
    }
    delete
}

/// One stored backup, as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub finished_at: Timestamp,
}

/// The backups retention drops: beyond the newest `keep_last`, or older
/// than `max_age`. The newest backup is never dropped, whatever the rules
/// say: a policy always keeps one backup to restore.
pub fn prune(backups: &[Stored], keep_last: usize, max_age: Option<SignedDuration>, now: Timestamp) -> Vec<String> {
    let mut sorted: Vec<&Stored> = backups.iter().collect();
    sorted.sort_by(|a, b| b.finished_at.cmp(&a.finished_at).then_with(|| b.id.cmp(&a.id)));
    sorted
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(i, b)| *i >= keep_last.max(1) || max_age.is_some_and(|age| now.duration_since(b.finished_at) > age))
        .map(|(_, b)| b.id.clone())
        .collect()
}

/// Slack on top of an interval before a run counts as late: a run takes
/// time after its slot.
pub const LATE_AFTER: SignedDuration = SignedDuration::from_secs(30 * 60);

/// How old the last successful backup may be (twice the schedule's
/// interval) and the last verified restore (the drill's interval, plus
/// slack) before the `backup` compliance entry fails.
pub fn freshness(settings: &Settings, now: Timestamp) -> (SignedDuration, Option<SignedDuration>) {
    let backup = settings.backup.typical_interval(now).checked_mul(2).unwrap_or(SignedDuration::MAX);
    let drill =
        settings.drill.as_ref().map(|d| d.typical_interval(now).checked_add(LATE_AFTER).unwrap_or(SignedDuration::MAX));
    (backup, drill)
}

#[cfg(test)]
mod tests;
