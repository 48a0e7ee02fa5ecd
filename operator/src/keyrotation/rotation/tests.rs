//! The state machine over simulated time: months of rotations, cron edge
//! cases, downtime, and a crash at every point of a rotation.

use std::collections::BTreeMap;

use super::*;
use crate::api::KeyRotationScheduleSpec;

fn at(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn hours(h: i64) -> SignedDuration {
    SignedDuration::from_hours(h)
}

fn spec(json: serde_json::Value) -> KeyRotationScheduleSpec {
    serde_json::from_value(json).unwrap()
}

fn interval(every: &str, grace: &str) -> Settings {
    settings(&spec(serde_json::json!({"algorithm": "aes-256", "interval": every, "gracePeriod": grace}))).unwrap()
}

fn cron(expression: &str, grace: &str) -> Settings {
    settings(&spec(serde_json::json!({"algorithm": "aes-256", "schedule": expression, "gracePeriod": grace}))).unwrap()
}

/// Where the simulated controller crashes in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    None,
    /// After writing the Secret, before writing the status.
    BeforeStatus,
}

/// The API server, the Secret and the consumers, as the controller sees them.
struct World {
    settings: Settings,
    status: KeyRotationScheduleStatus,
    /// Versions whose entries the Secret holds.
    secret: BTreeSet<i64>,
    /// How often each version was generated.
    generated: BTreeMap<i64, usize>,
    /// The key set fingerprint the consumers have rolled out.
    consumers: String,
    /// Consumers roll as soon as the key set changes.
    consumers_follow: bool,
    request: Option<String>,
    clients_changed: bool,
    /// Every version that was ever current, with the latest expiry seen.
    ever_current: BTreeMap<i64, Option<Timestamp>>,
    steps: Vec<(Timestamp, Step)>,
}

impl World {
    fn new(settings: Settings) -> Self {
        Self {
            settings,
            status: KeyRotationScheduleStatus::default(),
            secret: BTreeSet::new(),
            generated: BTreeMap::new(),
            consumers: String::new(),
            consumers_follow: true,
            request: None,
            clients_changed: false,
            ever_current: BTreeMap::new(),
            steps: Vec::new(),
        }
    }

    /// One reconcile at `now`.
    fn reconcile(&mut self, now: Timestamp, crash: Crash) -> Plan {
        let observed = Observed {
            status: &self.status,
            in_secret: &self.secret,
            clients_changed: self.clients_changed,
            rotate_request: self.request.as_deref(),
            consumers_rolled: self.consumers == fingerprint(&self.status),
            now,
        };
        let plan = plan(&self.settings, &observed);
        // The Secret: what the plan lists, generated ones included.
        for v in &plan.generate {
            *self.generated.entry(*v).or_default() += 1;
        }
        self.secret = plan.status.versions.iter().map(|v| v.version).collect();
        self.check(now);
        if crash == Crash::BeforeStatus {
            return plan;
        }
        self.status = plan.status.clone();
        self.steps.extend(plan.steps.iter().map(|s| (now, s.clone())));
        for v in &self.status.versions {
            if v.state == KeyVersionState::Current {
                self.ever_current.insert(v.version, None);
            }
            if let (Some(e), Some(expiry)) = (self.ever_current.get_mut(&v.version), v.expires_at.as_ref()) {
                *e = Some(expiry.0);
            }
        }
        self.check(now);
        if self.consumers_follow {
            self.consumers = fingerprint(&self.status);
        }
        plan
    }

    /// Reconciles until nothing more happens at `now` (at most 10 calls).
    fn settle(&mut self, now: Timestamp) {
        for _ in 0..10 {
            if self.reconcile(now, Crash::None).wake_at != Some(now) {
                return;
            }
        }
        panic!("no steady state at {now}: {:#?}", self.status);
    }

    /// Runs from `from` to `to`, reconciling every `step` and whenever the
    /// plan asked to be woken.
    fn run(&mut self, from: Timestamp, to: Timestamp, step: SignedDuration) {
        let mut now = from;
        while now <= to {
            self.settle(now);
            now = now.checked_add(step).unwrap();
        }
    }

    /// The invariants, after every write.
    fn check(&self, now: Timestamp) {
        for (version, expiry) in &self.ever_current {
            if expiry.is_none_or(|e| now < e) {
                assert!(
                    self.secret.contains(version),
                    "version {version} was current and has not expired, yet the Secret lost it at {now}"
                );
            }
        }
        for (version, count) in &self.generated {
            assert_eq!(*count, 1, "version {version} was generated {count} times");
        }
        let accepted = self.status.versions.iter().filter(|v| v.state.accepted()).count();
        assert!(accepted <= 2, "more than two versions accepted: {:#?}", self.status.versions);
        let current = self.status.versions.iter().filter(|v| v.state == KeyVersionState::Current).count();
        assert!(current <= 1, "two current versions: {:#?}", self.status.versions);
    }

    fn promotions(&self) -> Vec<(Timestamp, i64)> {
        self.steps
            .iter()
            .filter_map(|(t, s)| match s {
                Step::Promoted { version, .. } => Some((*t, *version)),
                _ => None,
            })
            .collect()
    }

    fn count(&self, reason: &str) -> usize {
        self.steps.iter().filter(|(_, s)| s.reason() == reason).count()
    }
}

#[test]
fn the_first_reconcile_issues_version_one() {
    let mut w = World::new(interval("30d", "24h"));
    let now = at("2027-01-01T00:00:00Z");
    let plan = w.reconcile(now, Crash::None);
    assert_eq!(plan.generate, BTreeSet::from([1]));
    assert_eq!(plan.steps, vec![Step::Issued { version: 1 }]);
    assert_eq!(w.status.current_version, Some(1));
    assert_eq!(w.status.next_rotation_time, Some(Time(at("2027-01-31T00:00:00Z"))));
    // Steady: nothing more until the next rotation.
    let plan = w.reconcile(now.checked_add(hours(1)).unwrap(), Crash::None);
    assert!(plan.steps.is_empty() && plan.generate.is_empty());
    assert_eq!(plan.wake_at, Some(at("2027-01-31T00:00:00Z")));
}

#[test]
fn an_interval_rotates_through_every_step_over_six_months() {
    let mut w = World::new(interval("30d", "24h"));
    w.run(at("2027-01-01T00:00:00Z"), at("2027-07-01T00:00:00Z"), hours(1));
    let promotions = w.promotions();
    assert_eq!(promotions.len(), 6, "{promotions:?}");
    // Each 30 days after the previous, to the hour (consumers roll at once).
    for (i, (t, version)) in promotions.iter().enumerate() {
        assert_eq!(*version, i as i64 + 2);
        let slot =
            at("2027-01-01T00:00:00Z").checked_add(SignedDuration::from_hours(24 * 30 * (i as i64 + 1))).unwrap();
        assert_eq!(*t, slot, "rotation {version}");
    }
    for reason in ["RotationStarted", "KeyRotated", "KeyRetired", "RotationCompleted"] {
        assert_eq!(w.count(reason), 6, "{reason}");
    }
    // keepVersions (3): the current, and two retired kept for decryption.
    let kept: Vec<(i64, KeyVersionState)> = w.status.versions.iter().map(|v| (v.version, v.state)).collect();
    assert_eq!(kept, vec![(7, KeyVersionState::Current), (6, KeyVersionState::Retired), (5, KeyVersionState::Retired)]);
    assert_eq!(w.count("KeyVersionsPruned"), 4);
    assert!(w.status.rotation.is_none());
}

#[test]
fn the_previous_version_is_accepted_for_exactly_the_grace_period() {
    let mut w = World::new(interval("7d", "24h"));
    let start = at("2027-03-01T00:00:00Z");
    w.settle(start);
    let rotated = start.checked_add(SignedDuration::from_hours(7 * 24)).unwrap();
    w.settle(rotated);
    assert_eq!(rotation_phase(&w), Some(RotationPhase::ConsumersRolled));
    assert_eq!(accepted(&w.status), vec![2, 1]);
    let previous = w.status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(previous.expires_at, Some(Time(rotated.checked_add(hours(24)).unwrap())));
    // One second before the end of the grace period: still accepted.
    w.settle(rotated.checked_add(hours(24) - SignedDuration::from_secs(1)).unwrap());
    assert_eq!(accepted(&w.status), vec![2, 1]);
    w.settle(rotated.checked_add(hours(24)).unwrap());
    assert_eq!(accepted(&w.status), vec![2]);
    assert!(w.status.rotation.is_none());
}

fn rotation_phase(w: &World) -> Option<RotationPhase> {
    w.status.rotation.as_ref().map(|r| r.phase)
}

#[test]
fn a_monthly_cron_rotates_on_the_first_at_two_for_a_year() {
    let mut w = World::new(cron("0 2 1 * *", "24h"));
    w.run(at("2027-01-15T00:00:00Z"), at("2028-01-15T00:00:00Z"), hours(1));
    let times: Vec<String> = w.promotions().iter().map(|(t, _)| t.to_string()).collect();
    let expected: Vec<String> =
        (2..=12).map(|m| format!("2027-{m:02}-01T02:00:00Z")).chain(["2028-01-01T02:00:00Z".to_owned()]).collect();
    assert_eq!(times, expected);
}

#[test]
fn the_29th_of_february_fires_only_in_leap_years() {
    let mut w = World::new(cron("0 0 29 2 *", "24h"));
    w.run(at("2026-01-01T00:00:00Z"), at("2033-01-01T00:00:00Z"), hours(6));
    let times: Vec<String> = w.promotions().iter().map(|(t, _)| t.to_string()).collect();
    assert_eq!(times, vec!["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"]);
}

#[test]
fn daylight_saving_changes_do_not_exist_in_utc() {
    // 02:30 does not exist in New York on 2027-03-14 nor in Berlin on
    // 2027-03-28, and happens twice on the autumn dates; in UTC every day has one.
    let mut w = World::new(cron("30 2 * * *", "1h"));
    w.run(at("2027-03-13T00:00:00Z"), at("2027-03-30T00:00:00Z"), SignedDuration::from_mins(15));
    w.run(at("2027-10-30T00:00:00Z"), at("2027-11-08T00:00:00Z"), SignedDuration::from_mins(15));
    let promotions = w.promotions();
    // 17 days in March (the 13th to the 29th), then one catch-up for the
    // months skipped, then 9 days in autumn (the 30th of October to the 7th
    // of November).
    assert_eq!(promotions.len(), 17 + 1 + 9, "{promotions:?}");
    for (t, _) in promotions.iter().filter(|(t, _)| *t != at("2027-10-30T00:00:00Z")) {
        assert!(t.to_string().ends_with("T02:30:00Z"), "{t}");
    }
}

#[test]
fn downtime_gives_one_catch_up_rotation_not_many() {
    let mut w = World::new(cron("0 3 * * *", "1h"));
    w.run(at("2027-05-01T00:00:00Z"), at("2027-05-02T12:00:00Z"), hours(1));
    assert_eq!(w.promotions().len(), 2);
    // Ten days without the operator.
    let back = at("2027-05-12T12:00:00Z");
    w.run(back, back.checked_add(hours(10)).unwrap(), hours(1));
    let after: Vec<&(Timestamp, Step)> =
        w.steps.iter().filter(|(t, s)| *t >= back && s.reason() == "RotationStarted").collect();
    assert_eq!(after.len(), 1, "{after:?}");
    let Step::Started { why: Trigger::Schedule { slot }, .. } = &after[0].1 else { panic!("{after:?}") };
    assert_eq!(*slot, at("2027-05-12T03:00:00Z"), "the latest missed slot");
    // And the next day's slot rotates as usual.
    w.run(back.checked_add(hours(11)).unwrap(), at("2027-05-13T06:00:00Z"), hours(1));
    assert_eq!(w.promotions().last().unwrap().0, at("2027-05-13T03:00:00Z"));
}

#[test]
fn a_crash_after_any_secret_write_never_loses_a_key_or_makes_two() {
    // Crash before the status write of the k-th call of a rotation, for
    // every k; World::check asserts the invariants after every write.
    for k in 0..8 {
        let mut w = World::new(interval("1h", "10m"));
        let start = at("2027-06-01T00:00:00Z");
        w.settle(start);
        let mut now = start.checked_add(hours(1)).unwrap();
        let mut crashed = false;
        for calls in 0..200 {
            let crash = if calls == k && !crashed { Crash::BeforeStatus } else { Crash::None };
            crashed |= crash == Crash::BeforeStatus;
            let plan = w.reconcile(now, crash);
            if plan.wake_at != Some(now) && crash == Crash::None {
                now = now.checked_add(SignedDuration::from_mins(1)).unwrap();
            }
            if w.status.current_version == Some(2) && w.status.rotation.is_none() {
                break;
            }
        }
        assert_eq!(w.status.current_version, Some(2), "crash at call {k}: the rotation completes");
        assert!(w.status.rotation.is_none(), "crash at call {k}");
        assert_eq!(w.generated.keys().copied().collect::<Vec<_>>(), vec![1, 2], "crash at call {k}");
        assert_eq!(w.count("KeyRotated"), 1, "crash at call {k}");
    }
}

#[test]
fn a_version_in_the_secret_but_not_in_status_is_resumed_not_duplicated() {
    let mut w = World::new(interval("1h", "10m"));
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    let slot = start.checked_add(hours(1)).unwrap();
    let plan = w.reconcile(slot, Crash::BeforeStatus);
    assert_eq!(plan.generate, BTreeSet::from([2]));
    // The manual request is withdrawn and the slot passed: the orphan is
    // still taken up as the rotation under way, without generating again.
    let plan = w.reconcile(slot.checked_add(SignedDuration::from_secs(5)).unwrap(), Crash::None);
    assert!(plan.generate.is_empty(), "{plan:?}");
    assert!(matches!(plan.steps[0], Step::Started { version: 2, why: Trigger::Resumed, .. }), "{:?}", plan.steps);
}

#[test]
fn consumers_that_have_not_rolled_hold_the_rotation_and_the_current_key_never_expires() {
    let mut w = World::new(interval("1h", "10m"));
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    w.consumers_follow = false;
    let mut now = start;
    for _ in 0..(3 * 24) {
        now = now.checked_add(hours(1)).unwrap();
        w.settle(now);
    }
    assert_eq!(rotation_phase(&w), Some(RotationPhase::Created));
    assert_eq!(w.status.current_version, Some(1));
    let one = w.status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!((one.state, one.expires_at.clone()), (KeyVersionState::Current, None));
    assert_eq!(w.count("RotationStarted"), 1, "one rotation at a time");
    // Once they roll, the rotation proceeds, and one catch-up follows.
    w.consumers_follow = true;
    w.consumers = fingerprint(&w.status);
    w.run(now, now.checked_add(SignedDuration::from_mins(30)).unwrap(), SignedDuration::from_mins(5));
    assert_eq!(w.count("KeyRotated"), 2);
}

#[test]
fn the_rotate_annotation_rotates_once_per_value_and_suspend_stops_it() {
    let mut w = World::new(interval("30d", "1h"));
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    w.request = Some("2027-06-01T10:00:00Z".into());
    w.run(start.checked_add(hours(10)).unwrap(), start.checked_add(hours(13)).unwrap(), SignedDuration::from_mins(10));
    assert_eq!(w.count("KeyRotated"), 1);
    assert_eq!(w.status.last_handled_rotate_request.as_deref(), Some("2027-06-01T10:00:00Z"));
    // The next scheduled rotation counts from the manual one.
    assert_eq!(w.status.next_rotation_time, Some(Time(at("2027-07-01T10:00:00Z"))));
    w.request = Some("again".into());
    w.settings.suspend = true;
    w.run(start.checked_add(hours(14)).unwrap(), at("2027-09-01T00:00:00Z"), hours(6));
    assert_eq!(w.count("KeyRotated"), 1, "suspended: neither the request nor the schedule rotates");
    assert_eq!(w.status.next_rotation_time, None);
    w.settings.suspend = false;
    w.settle(at("2027-09-01T00:00:00Z"));
    assert_eq!(w.count("RotationStarted"), 2);
}

#[test]
fn a_change_of_clients_rotates_at_once_even_when_suspended_and_revokes() {
    let mut w = World::new(interval("30d", "1h"));
    w.settings.suspend = true;
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    w.clients_changed = true;
    let plan = w.reconcile(start.checked_add(hours(1)).unwrap(), Crash::None);
    assert!(plan.revoke_removed_clients);
    assert!(matches!(plan.steps[0], Step::Started { why: Trigger::ClientsChanged, .. }), "{:?}", plan.steps);
}

#[test]
fn accepted_versions_deleted_by_hand_are_reissued_and_change_the_fingerprint() {
    let mut w = World::new(interval("30d", "1h"));
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    let before = fingerprint(&w.status);
    w.secret.clear();
    w.generated.clear();
    let later = start.checked_add(hours(5)).unwrap();
    let plan = w.reconcile(later, Crash::None);
    assert_eq!(plan.generate, BTreeSet::from([1]));
    assert_eq!(plan.steps, vec![Step::Reissued { versions: vec![1] }]);
    assert!(plan.steps[0].is_warning());
    assert_ne!(fingerprint(&w.status), before, "consumers roll to the reissued key");
}

#[test]
fn versions_without_a_status_record_are_adopted_with_a_grace_period() {
    let mut w = World::new(interval("30d", "1h"));
    w.secret = BTreeSet::from([4, 5]);
    let now = at("2027-06-01T00:00:00Z");
    let plan = w.reconcile(now, Crash::None);
    assert!(plan.generate.is_empty());
    assert_eq!(w.status.current_version, Some(5));
    assert_eq!(accepted(&w.status), vec![5, 4]);
    w.run(now, now.checked_add(hours(2)).unwrap(), SignedDuration::from_mins(5));
    assert_eq!(accepted(&w.status), vec![5]);
    assert!(w.status.rotation.is_none());
}

#[test]
fn settings_name_the_field_that_is_wrong() {
    let cases = [
        (serde_json::json!({"algorithm": "aes-256", "interval": "1h", "gracePeriod": "2h"}), "spec.gracePeriod"),
        (serde_json::json!({"algorithm": "aes-256", "interval": "1h", "gracePeriod": "0s"}), "spec.gracePeriod"),
        (serde_json::json!({"algorithm": "aes-256", "schedule": "0 0 31 2 *"}), "spec.schedule"),
        (serde_json::json!({"algorithm": "aes-256"}), "spec.schedule"),
        (serde_json::json!({"algorithm": "api-key", "interval": "30d"}), "spec.clients"),
        (serde_json::json!({"algorithm": "api-key", "interval": "30d", "clients": ["a", "a"]}), "spec.clients"),
        (serde_json::json!({"algorithm": "hmac-sha256", "interval": "30d", "clients": ["a"]}), "spec.clients"),
        (serde_json::json!({"algorithm": "aes-256", "interval": "30d", "keepVersions": 1}), "spec.keepVersions"),
    ];
    for (json, field) in cases {
        let err = settings(&spec(json.clone())).expect_err(&json.to_string());
        assert_eq!(err.field, field, "{json}: {err}");
    }
}

#[test]
fn a_grace_period_is_never_cut_short_by_whole_second_status_times() {
    let mut w = World::new(interval("1h", "10s"));
    let start = at("2027-06-01T00:00:00Z");
    w.settle(start);
    let promoted = at("2027-06-01T01:00:00.25Z");
    w.settle(promoted);
    let previous = w.status.versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(previous.expires_at, Some(Time(at("2027-06-01T01:00:11Z"))), "10.25 s rounds up to 11 s");
}
