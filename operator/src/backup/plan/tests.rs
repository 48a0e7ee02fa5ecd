use super::*;
use crate::api::{BackupDestination, BackupEncryption, PvcDestination, RestoreDrill, Retention};

fn t(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn spec(schedule: &str, drill: Option<&str>) -> BackupPolicySpec {
    BackupPolicySpec {
        endpoint: "patients".into(),
        schedule: schedule.into(),
        destination: BackupDestination {
            persistent_volume_claim: Some(PvcDestination { claim_name: "backups".into(), path: String::new() }),
            s3: None,
        },
        encryption: BackupEncryption { key_schedule: "backup-key".into() },
        retention: Retention::default(),
        restore_drill: drill.map(|s| RestoreDrill { schedule: s.into() }),
        suspend: false,
    }
}

fn report(finished: Timestamp) -> BackupReport {
    BackupReport {
        location: "directory /backups: clinic/nightly/x.dump.age".into(),
        size_bytes: 1234,
        sha256: "ab".repeat(32),
        key_version: 3,
        started_at: finished,
        finished_at: finished,
        tables: 6,
        rows: 100,
        pruned: vec![],
    }
}

/// A cluster that runs every created Job to `outcome` by the next reconcile.
struct Sim {
    settings: Settings,
    status: BackupPolicyStatus,
    jobs: Vec<JobView>,
    created: Vec<String>,
    anchor: Timestamp,
}

impl Sim {
    fn new(spec: &BackupPolicySpec, anchor: Timestamp) -> Self {
        Sim { settings: settings(spec).unwrap(), status: Default::default(), jobs: vec![], created: vec![], anchor }
    }

    fn reconcile(&mut self, now: Timestamp, request: Option<&str>) -> Plan {
        let plan = plan(
            &self.settings,
            &Observed { policy: "nightly", status: &self.status, jobs: &self.jobs, request, anchor: self.anchor, now },
        );
        self.status = plan.status.clone();
        for job in &plan.create {
            // Creating an existing Job is a no-op (AlreadyExists).
            if !self.jobs.iter().any(|j| j.name == job.name) {
                self.created.push(job.name.clone());
                self.jobs.push(JobView {
                    name: job.name.clone(),
                    kind: job.kind,
                    slot: job.slot,
                    state: JobState::Running,
                });
            }
        }
        self.jobs.retain(|j| !plan.delete.contains(&j.name));
        plan
    }

    fn finish_all(&mut self, at: Timestamp) {
        for job in self.jobs.iter_mut().filter(|j| j.state == JobState::Running) {
            job.state = match job.kind {
                RunKind::Backup => JobState::BackupSucceeded(report(at)),
                RunKind::Drill => JobState::DrillSucceeded(DrillReport {
                    backup: "x".into(),
                    duration_seconds: 2.5,
                    finished_at: at,
                    tables: 6,
                    rows: 100,
                }),
            };
        }
    }
}

#[test]
fn job_names_are_derived_from_the_policy_and_the_slot() {
    let slot = t("2026-11-22T01:30:00Z");
    assert_eq!(job_name("nightly", RunKind::Backup, slot), "nightly-202611220130");
    assert_eq!(job_name("nightly", RunKind::Drill, slot), "nightly-drill-202611220130");
    assert_eq!(manual_job_name("nightly", "2026-11-22 ticket 42"), manual_job_name("nightly", "2026-11-22 ticket 42"));
    assert_ne!(manual_job_name("nightly", "a"), manual_job_name("nightly", "b"));
    assert!(manual_job_name("nightly", "a").starts_with("nightly-now-"));
    // Long names are cut to 63 characters with a hash, so two long policies never collide.
    let long_a = format!("{}-a", "p".repeat(70));
    let long_b = format!("{}-b", "p".repeat(70));
    let (a, b) = (job_name(&long_a, RunKind::Drill, slot), job_name(&long_b, RunKind::Drill, slot));
    assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
    assert_ne!(a, b);
    assert!(a.ends_with("-drill-202611220130"), "{a}");
    assert!(a.chars().next().unwrap().is_ascii_alphanumeric());
}

#[test]
fn one_job_per_slot_over_a_simulated_week_with_exact_names() {
    let mut sim = Sim::new(&spec("30 1 * * *", Some("0 4 * * 0")), t("2026-11-15T12:00:00Z"));
    let mut now = t("2026-11-15T12:00:00Z");
    // Every 10 minutes for 8 days; Jobs finish 5 minutes after they start.
    while now < t("2026-11-23T12:00:00Z") {
        sim.reconcile(now, None);
        now = now.checked_add(SignedDuration::from_mins(5)).unwrap();
        sim.finish_all(now);
        now = now.checked_add(SignedDuration::from_mins(5)).unwrap();
    }
    sim.reconcile(now, None);
    let backups: Vec<&String> = sim.created.iter().filter(|n| !n.contains("drill")).collect();
    assert_eq!(
        backups,
        [
            "nightly-202611160130",
            "nightly-202611170130",
            "nightly-202611180130",
            "nightly-202611190130",
            "nightly-202611200130",
            "nightly-202611210130",
            "nightly-202611220130",
            "nightly-202611230130",
        ]
    );
    // Sunday 22 November 04:00: one drill.
    let drills: Vec<&String> = sim.created.iter().filter(|n| n.contains("drill")).collect();
    assert_eq!(drills, ["nightly-drill-202611220400"]);
    assert_eq!(sim.status.history.len(), 8);
    assert!(sim.status.history.iter().all(|r| r.outcome == BackupOutcome::Succeeded));
    assert_eq!(sim.status.last_successful_backup.as_ref().unwrap().job, "nightly-202611230130");
    assert_eq!(sim.status.last_verified_restore.as_ref().unwrap().job, "nightly-drill-202611220400");
    assert_eq!(sim.status.next_schedule_time.as_ref().unwrap().0, t("2026-11-24T01:30:00Z"));
    assert_eq!(sim.status.next_drill_schedule_time.as_ref().unwrap().0, t("2026-11-29T04:00:00Z"));
    // Finished Jobs are cleaned up to the kept few.
    let backup_jobs = sim.jobs.iter().filter(|j| j.kind == RunKind::Backup).count();
    assert_eq!(backup_jobs, SUCCEEDED_JOBS_KEPT);
}

#[test]
fn a_restart_or_a_second_replica_asks_for_the_same_job_only() {
    let spec = spec("*/15 * * * *", None);
    let settings = settings(&spec).unwrap();
    let status = BackupPolicyStatus::default();
    let now = t("2026-11-22T10:16:00Z");
    let observed =
        Observed { policy: "p", status: &status, jobs: &[], request: None, anchor: t("2026-11-22T10:00:00Z"), now };
    let first = plan(&settings, &observed);
    let second = plan(&settings, &observed);
    assert_eq!(first.create, second.create);
    assert_eq!(first.create[0].name, "p-202611221015");
    // The status write was lost and the Job exists: still that Job, and one history record.
    let jobs = [JobView {
        name: "p-202611221015".into(),
        kind: RunKind::Backup,
        slot: t("2026-11-22T10:15:00Z"),
        state: JobState::Running,
    }];
    let again = plan(&settings, &Observed { jobs: &jobs, ..observed });
    assert_eq!(again.create[0].name, "p-202611221015");
    assert_eq!(again.status.history.len(), 1);
}

#[test]
fn downtime_gives_one_catch_up_not_a_burst() {
    let mut sim = Sim::new(&spec("0 * * * *", None), t("2026-11-20T00:00:00Z"));
    sim.reconcile(t("2026-11-20T00:30:00Z"), None);
    assert!(sim.created.is_empty());
    sim.reconcile(t("2026-11-20T01:00:10Z"), None);
    assert_eq!(sim.created, ["nightly-202611200100"]);
    sim.finish_all(t("2026-11-20T01:05:00Z"));
    // Down for two days: one backup, for the latest missed slot.
    let plan = sim.reconcile(t("2026-11-22T07:42:00Z"), None);
    assert_eq!(plan.create.len(), 1);
    assert_eq!(sim.created, ["nightly-202611200100", "nightly-202611220700"]);
    assert_eq!(plan.wake_at, Some(t("2026-11-22T08:00:00Z")));
}

#[test]
fn suspend_pauses_and_a_request_runs_once() {
    let mut spec = spec("0 2 * * *", None);
    spec.suspend = true;
    let mut sim = Sim::new(&spec, t("2026-11-20T00:00:00Z"));
    let plan = sim.reconcile(t("2026-11-22T03:00:00Z"), Some("now please"));
    assert!(plan.create.is_empty());
    assert_eq!(plan.status.next_schedule_time, None);
    assert_eq!(plan.wake_at, None);
    assert_eq!(plan.status.last_handled_backup_request, None, "a request waits for the end of suspend");

    let mut sim = Sim::new(&self::spec("0 2 * * *", None), t("2026-11-22T02:30:00Z"));
    let plan = sim.reconcile(t("2026-11-22T03:00:00Z"), Some("now please"));
    assert_eq!(plan.create.len(), 1);
    assert_eq!(plan.create[0].name, manual_job_name("nightly", "now please"));
    assert_eq!(plan.status.last_handled_backup_request.as_deref(), Some("now please"));
    assert!(sim.reconcile(t("2026-11-22T03:01:00Z"), Some("now please")).create.is_empty());
    assert_eq!(sim.reconcile(t("2026-11-22T03:02:00Z"), Some("again")).create.len(), 1);
}

#[test]
fn a_failed_job_is_recorded_and_the_drill_waits_for_a_good_backup() {
    let mut sim = Sim::new(&spec("0 2 * * *", Some("0 3 * * *")), t("2026-11-21T12:00:00Z"));
    sim.reconcile(t("2026-11-22T02:00:00Z"), None);
    sim.jobs[0].state =
        JobState::Failed { message: "pg_dump: connection refused".into(), finished: Some(t("2026-11-22T02:01:00Z")) };
    let plan = sim.reconcile(t("2026-11-22T02:02:00Z"), None);
    let failed = plan.status.last_failed_backup.as_ref().unwrap();
    assert_eq!(failed.job, "nightly-202611220200");
    assert_eq!(failed.outcome, BackupOutcome::Failed);
    assert_eq!(failed.message.as_deref(), Some("pg_dump: connection refused"));
    assert!(plan.status.last_successful_backup.is_none());
    assert!(matches!(plan.steps.as_slice(), [Step::BackupFailed(_)]));
    // Recorded once only.
    assert!(sim.reconcile(t("2026-11-22T02:03:00Z"), None).steps.is_empty());
    // The drill's slot comes with no good backup: skipped, not run.
    let plan = sim.reconcile(t("2026-11-22T03:00:00Z"), None);
    assert!(plan.create.is_empty());
    assert!(matches!(plan.steps.as_slice(), [Step::DrillSkipped { .. }]));
}

#[test]
fn a_job_deleted_before_its_result_was_read_is_failed_after_a_while() {
    let mut sim = Sim::new(&spec("0 2 * * *", None), t("2026-11-21T12:00:00Z"));
    sim.reconcile(t("2026-11-22T02:00:00Z"), None);
    sim.jobs.clear();
    let plan = sim.reconcile(t("2026-11-22T02:01:00Z"), None);
    assert_eq!(plan.status.history[0].outcome, BackupOutcome::Running);
    assert_eq!(plan.wake_at, Some(t("2026-11-22T02:05:00Z")));
    let plan = sim.reconcile(t("2026-11-22T02:05:00Z"), None);
    assert_eq!(plan.status.history[0].outcome, BackupOutcome::Failed);
    assert!(plan.status.last_failed_backup.is_some());
}

#[test]
fn history_is_bounded_newest_first() {
    let mut sim = Sim::new(&spec("0 * * * *", None), t("2026-11-20T00:00:00Z"));
    let mut now = t("2026-11-20T00:00:30Z");
    for _ in 0..30 {
        now = now.checked_add(SignedDuration::from_hours(1)).unwrap();
        sim.reconcile(now, None);
        sim.finish_all(now);
    }
    sim.reconcile(now, None);
    assert_eq!(sim.status.history.len(), HISTORY_LIMIT);
    assert!(sim.status.history.windows(2).all(|w| w[0].time.0 > w[1].time.0));
}

#[test]
fn retention_never_prunes_the_newest_backup() {
    let now = t("2026-11-22T00:00:00Z");
    let stored = |id: &str, days_ago: i64| Stored {
        id: id.into(),
        finished_at: now.checked_sub(SignedDuration::from_hours(24 * days_ago)).unwrap(),
    };
    let backups = [stored("a", 40), stored("b", 20), stored("c", 10), stored("d", 1)];
    assert_eq!(prune(&backups, 2, None, now), ["b", "a"]);
    assert_eq!(prune(&backups, 10, Some(SignedDuration::from_hours(24 * 30)), now), ["a"]);
    assert_eq!(prune(&backups, 1, None, now), ["c", "b", "a"]);
    // Every backup older than maxAge: the newest stays anyway.
    assert_eq!(prune(&backups, 10, Some(SignedDuration::from_hours(12)), now), ["c", "b", "a"]);
    assert_eq!(prune(&[stored("only", 400)], 1, Some(SignedDuration::from_hours(1)), now), Vec::<String>::new());
    assert!(prune(&[], 1, None, now).is_empty());
}

#[test]
fn bad_settings_name_the_field() {
    let error = settings(&spec("61 * * * *", None)).unwrap_err();
    assert_eq!(error.field, "spec.schedule");
    assert!(error.message.contains("minute"), "{error}");
    let error = settings(&spec("0 2 * * *", Some("0 2 30 2 *"))).unwrap_err();
    assert_eq!(error.field, "spec.restoreDrill.schedule");
    let mut bad = spec("0 2 * * *", None);
    bad.retention.max_age = Some("0d".into());
    assert_eq!(settings(&bad).unwrap_err().field, "spec.retention.maxAge");
    let mut bad = spec("0 2 * * *", None);
    bad.destination.persistent_volume_claim.as_mut().unwrap().path = "a/../../etc".into();
    assert_eq!(settings(&bad).unwrap_err().field, "spec.destination.persistentVolumeClaim.path");
}
