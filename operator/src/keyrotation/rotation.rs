//! The rotation state machine of a KeyRotationSchedule, as a pure function
//! of what the operator observes. No client, no clock, no randomness: the
//! controller reads the schedule's status, the versions its Secret holds and
//! whether every consumer has rolled, asks [`plan`] what to do, writes the
//! Secret, then the status.
//!
//! A rotation from version N to N+1, each step recorded in status once done:
//!
//! 1. `Created`: N+1 is generated into the Secret beside N (state `Pending`);
//!    consumers roll to accept both. Clients still get N.
//! 2. `ConsumersRolled`: every consumer accepts N+1, so it becomes `Current`
//!    (clients get it from now on) and N becomes `Previous`, accepted until
//!    `expiresAt` = now + `spec.gracePeriod`.
//! 3. `Retired`: the grace period is over; N is no longer accepted (it stays
//!    in the Secret while `spec.keepVersions` allows) and consumers roll again.
//! 4. Once they have, the rotation is over.
//!
//! Crash safety: the Secret is written before the status that records a
//! step, and everything here is decided from the status and the Secret as
//! they are. A crash after the Secret gained N+1 but before the status said
//! so leaves a version in the Secret above every recorded one: the next
//! reconcile adopts it as the rotation under way instead of generating
//! another. Nothing accepted is ever removed from the Secret, and the current
//! version never expires, so a restart at any point loses no valid key.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::schedule::{Cadence, cadence, parse_duration};
use crate::api::{
    KeyAlgorithm, KeyRotationScheduleSpec, KeyRotationScheduleStatus, KeyVersion, KeyVersionState, RotationPhase,
    RotationProgress,
};
use crate::fhirendpoint::validate::InvalidSpec;
use crate::meta::hash_of;

/// Annotation asking for a rotation now: set it to any new value
/// (e.g. the current time); the value handled last is in
/// `status.lastHandledRotateRequest`.
pub const ROTATE_ANNOTATION: &str = "fhiroperator.io/rotate";

/// A validated spec, in the units the state machine works in.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub cadence: Cadence,
    pub grace: SignedDuration,
    /// Versions the Secret keeps, the current one included.
    pub keep: usize,
    pub suspend: bool,
}

/// Checks what the schema cannot (or, on servers that drop CEL rules, did
/// not): the cadence, the grace period against an interval, the clients.
/// The error names the field.
pub fn settings(spec: &KeyRotationScheduleSpec) -> Result<Settings, InvalidSpec> {
    let invalid = |field: &str, message: String| InvalidSpec { field: field.to_owned(), message };
    let cadence = cadence(spec.schedule.as_deref(), spec.interval.as_deref(), "spec")?;
    let grace = parse_duration(&spec.grace_period).ok_or_else(|| {
        invalid("spec.gracePeriod", format!("{:?} is not a positive duration such as 24h or 1h30m", spec.grace_period))
    })?;
    if let Cadence::Interval(interval) = &cadence
        && grace >= *interval
    {
        return Err(invalid(
            "spec.gracePeriod",
            format!(
                "{} must be shorter than spec.interval ({}): a rotation finishes its grace period before the next one",
                spec.grace_period,
                spec.interval.as_deref().unwrap_or_default()
            ),
        ));
    }
    if !(2..=10).contains(&spec.keep_versions) {
        return Err(invalid(
            "spec.keepVersions",
            format!("{} is out of range: between 2 (the current and the previous version) and 10", spec.keep_versions),
        ));
    }
    match (spec.algorithm, spec.clients.is_empty()) {
        (KeyAlgorithm::ApiKey, true) => {
            return Err(invalid("spec.clients", "algorithm api-key needs at least one client id".into()));
        }
        (KeyAlgorithm::ApiKey, false) => {
            let mut seen = BTreeSet::new();
            if let Some(twice) = spec.clients.iter().find(|c| !seen.insert(c.as_str())) {
                return Err(invalid("spec.clients", format!("client id {twice:?} is listed more than once")));
            }
        }
        (_, false) => {
            return Err(invalid("spec.clients", "client ids are only allowed for algorithm api-key".into()));
        }
        (_, true) => {}
    }
    Ok(Settings { cadence, grace, keep: spec.keep_versions as usize, suspend: spec.suspend })
}

/// What the controller observed, for [`plan`].
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// The schedule's status as the API server holds it.
    pub status: &'a KeyRotationScheduleStatus,
    /// Versions the Secret holds entries of.
    pub in_secret: &'a BTreeSet<i64>,
    /// `api-key`: the current version's clients differ from `spec.clients`.
    pub clients_changed: bool,
    /// The value of [`ROTATE_ANNOTATION`], if set.
    pub rotate_request: Option<&'a str>,
    /// Every consumer accepts exactly the versions the status lists as
    /// accepted, and has finished rolling out.
    pub consumers_rolled: bool,
    pub now: Timestamp,
}

/// Something [`plan`] did, for events and logs. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The first version of a new schedule.
    Issued { version: i64 },
    /// Versions found in the Secret with no status (e.g. the status was
    /// lost): taken over, the newest as current.
    Adopted { versions: Vec<i64> },
    /// A rotation began: `version` is in the Secret beside `current`.
    Started { version: i64, current: i64, why: Trigger },
    /// `version` is current; `previous` is accepted until `until`.
    Promoted { version: i64, previous: Vec<i64>, until: Timestamp },
    /// The grace period of `versions` ended; they are no longer accepted.
    Retired { versions: Vec<i64> },
    /// Consumers no longer accept the retired versions: the rotation is over.
    Completed { version: i64 },
    /// Retired versions beyond `spec.keepVersions` were removed.
    Pruned { versions: Vec<i64> },
    /// Accepted versions were missing from the Secret (deleted by someone
    /// else) and were generated anew; clients must fetch them again.
    Reissued { versions: Vec<i64> },
    /// Retired versions were missing from the Secret and are forgotten.
    Forgotten { versions: Vec<i64> },
}

/// Why a rotation started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A slot of the schedule or interval.
    Schedule { slot: Timestamp },
    /// The rotate annotation changed.
    Requested,
    /// `spec.clients` changed: the new key set has exactly those clients.
    ClientsChanged,
    /// A version was found in the Secret above every recorded one: a
    /// rotation interrupted before its first step was recorded.
    Resumed,
}

impl Step {
    /// The event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Step::Issued { .. } => "KeyIssued",
            Step::Adopted { .. } => "KeysAdopted",
            Step::Started { .. } => "RotationStarted",
            Step::Promoted { .. } => "KeyRotated",
            Step::Retired { .. } => "KeyRetired",
            Step::Completed { .. } => "RotationCompleted",
            Step::Pruned { .. } => "KeyVersionsPruned",
            Step::Reissued { .. } => "KeyMaterialLost",
            Step::Forgotten { .. } => "KeyMaterialLost",
        }
    }

    /// Whether the event is a warning.
    pub fn is_warning(&self) -> bool {
        matches!(self, Step::Reissued { .. } | Step::Forgotten { .. })
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Issued { version } => write!(f, "issued key version {version}"),
            Step::Adopted { versions } => {
                write!(f, "took over key versions {versions:?} found in the Secret without a status record")
            }
            Step::Started { version, current, why } => {
                let why = match why {
                    Trigger::Schedule { slot } => format!("scheduled for {slot}"),
                    Trigger::Requested => format!("requested with the {ROTATE_ANNOTATION} annotation"),
                    Trigger::ClientsChanged => "spec.clients changed".to_owned(),
                    Trigger::Resumed => "resumed after a restart".to_owned(),
                };
                write!(
                    f,
                    "rotation {why}: created key version {version} beside version {current}; \
                     rolling consumers to accept both"
                )
            }
            Step::Promoted { version, previous, until } => write!(
                f,
                "every consumer accepts key version {version}: it is current; version(s) {previous:?} \
                 stay accepted until {until}"
            ),
            Step::Retired { versions } => {
                write!(f, "grace period over: key version(s) {versions:?} retired; rolling consumers")
            }
            Step::Completed { version } => {
                write!(f, "rotation to key version {version} complete: consumers accept only the current keys")
            }
            Step::Pruned { versions } => {
                write!(f, "removed retired key version(s) {versions:?} from the Secret (spec.keepVersions)")
            }
            Step::Reissued { versions } => write!(
                f,
                "key version(s) {versions:?} were missing from the Secret and were generated anew; \
                 clients must fetch their keys again"
            ),
            Step::Forgotten { versions } => {
                write!(f, "retired key version(s) {versions:?} were missing from the Secret")
            }
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The status to record (conditions, consumers and observedGeneration
    /// are the controller's), once the Secret holds what it lists.
    pub status: KeyRotationScheduleStatus,
    /// Versions to generate into the Secret (new, or lost and reissued).
    pub generate: BTreeSet<i64>,
    /// Drop other clients' entries from every version (a rotation started
    /// because `spec.clients` changed: removed clients are revoked at once).
    pub revoke_removed_clients: bool,
    pub steps: Vec<Step>,
    /// When to look again without any event: the next slot, the end of a
    /// grace period, or now when a step was taken.
    pub wake_at: Option<Timestamp>,
}

/// The versions consumers accept, newest first.
pub fn accepted(status: &KeyRotationScheduleStatus) -> Vec<i64> {
    status.versions.iter().filter(|v| v.state.accepted()).map(|v| v.version).collect()
}

/// Identifies the accepted key set: the versions and when each was issued
/// (a version generated anew after it was lost gets a new time). The
/// FhirEndpoint controller puts it on the pod template, so consumers roll
/// exactly when it changes. Public metadata only.
pub fn fingerprint(status: &KeyRotationScheduleStatus) -> String {
    let set: Vec<(i64, Timestamp)> =
        status.versions.iter().filter(|v| v.state.accepted()).map(|v| (v.version, v.created_at.0)).collect();
    hash_of(&set)[..16].to_owned()
}

fn version(version: i64, state: KeyVersionState, now: Timestamp) -> KeyVersion {
    KeyVersion { version, created_at: Time(now), expires_at: None, state }
}

/// What to do, given what was observed. One step per call (besides
/// repairs): the controller writes, and the write's own watch event brings
/// the next call.
pub fn plan(settings: &Settings, observed: &Observed<'_>) -> Plan {
    let now = observed.now;
    let mut status = observed.status.clone();
    let mut plan = Plan {
        status: KeyRotationScheduleStatus::default(),
        generate: BTreeSet::new(),
        revoke_removed_clients: false,
        steps: Vec::new(),
        wake_at: None,
    };
    status.versions.sort_by_key(|v| std::cmp::Reverse(v.version));

    if status.versions.is_empty() {
        if observed.in_secret.is_empty() {
            status.versions.push(version(1, KeyVersionState::Current, now));
            status.current_version = Some(1);
            status.last_rotation_time = Some(Time(now));
            status.rotation = None;
            plan.generate.insert(1);
            plan.steps.push(Step::Issued { version: 1 });
        } else {
            adopt(settings, observed, &mut status, &mut plan);
        }
        return finish(settings, status, plan, now, true);
    }

    // The record and the Secret agree: repair what someone else removed.
    let lost: Vec<i64> =
        status.versions.iter().filter(|v| !observed.in_secret.contains(&v.version)).map(|v| v.version).collect();
    if !lost.is_empty() {
        let mut reissued = Vec::new();
        let mut forgotten = Vec::new();
        status.versions.retain_mut(|v| {
            if !lost.contains(&v.version) {
                return true;
            }
            if v.state.accepted() {
                v.created_at = Time(now);
                reissued.push(v.version);
                true
            } else {
                forgotten.push(v.version);
                false
            }
        });
        plan.generate.extend(reissued.iter().copied());
        if !reissued.is_empty() {
            plan.steps.push(Step::Reissued { versions: reissued });
        }
        if !forgotten.is_empty() {
            plan.steps.push(Step::Forgotten { versions: forgotten });
        }
        return finish(settings, status, plan, now, true);
    }

    let recorded_max = status.versions.first().map_or(0, |v| v.version);
    let took_step = match status.rotation.clone() {
        None => {
            let orphan = observed.in_secret.last().copied().filter(|v| *v > recorded_max);
            let trigger = match orphan {
                Some(_) => Some(Trigger::Resumed),
                None => due(settings, &status, observed),
            };
            match trigger {
                Some(why) => {
                    let target = orphan.unwrap_or(recorded_max + 1);
                    if orphan.is_none() {
                        plan.generate.insert(target);
                    }
                    plan.revoke_removed_clients = why == Trigger::ClientsChanged;
                    let current = status.current_version.unwrap_or(recorded_max);
                    status.versions.insert(0, version(target, KeyVersionState::Pending, now));
                    status.rotation = Some(RotationProgress {
                        target_version: target,
                        phase: RotationPhase::Created,
                        started_at: Time(now),
                        slot: match &why {
                            Trigger::Schedule { slot } => Some(Time(*slot)),
                            _ => None,
                        },
                    });
                    if let Some(request) = observed.rotate_request {
                        status.last_handled_rotate_request = Some(request.to_owned());
                    }
                    plan.steps.push(Step::Started { version: target, current, why });
                    true
                }
                None => false,
            }
        }
        Some(mut rotation) => match rotation.phase {
            RotationPhase::Created if observed.consumers_rolled => {
                let until = grace_end(now, settings.grace);
                let mut previous = Vec::new();
                for v in &mut status.versions {
                    if v.version == rotation.target_version {
                        v.state = KeyVersionState::Current;
                    } else if v.state == KeyVersionState::Current {
                        v.state = KeyVersionState::Previous;
                        v.expires_at = Some(Time(until));
                        previous.push(v.version);
                    }
                }
                status.current_version = Some(rotation.target_version);
                status.last_rotation_time = Some(rotation.slot.clone().unwrap_or(rotation.started_at.clone()));
                rotation.phase = RotationPhase::ConsumersRolled;
                plan.steps.push(Step::Promoted { version: rotation.target_version, previous, until });
                status.rotation = Some(rotation);
                true
            }
            RotationPhase::ConsumersRolled => {
                let expired: Vec<i64> = status
                    .versions
                    .iter()
                    .filter(|v| {
                        v.state == KeyVersionState::Previous && v.expires_at.as_ref().is_none_or(|t| t.0 <= now)
                    })
                    .map(|v| v.version)
                    .collect();
                let waiting = status
                    .versions
                    .iter()
                    .any(|v| v.state == KeyVersionState::Previous && !expired.contains(&v.version));
                if !expired.is_empty() && !waiting {
                    for v in &mut status.versions {
                        if expired.contains(&v.version) {
                            v.state = KeyVersionState::Retired;
                        }
                    }
                    rotation.phase = RotationPhase::Retired;
                    status.rotation = Some(rotation);
                    plan.steps.push(Step::Retired { versions: expired });
                    true
                } else if expired.is_empty() && !waiting {
                    // Nothing left in its grace period (e.g. the previous
                    // version was lost): nothing to retire.
                    rotation.phase = RotationPhase::Retired;
                    status.rotation = Some(rotation);
                    true
                } else {
                    false
                }
            }
            RotationPhase::Retired if observed.consumers_rolled => {
                status.rotation = None;
                plan.steps.push(Step::Completed { version: rotation.target_version });
                true
            }
            RotationPhase::Created | RotationPhase::Retired => false,
        },
    };
    finish(settings, status, plan, now, took_step)
}

/// Takes over the versions of a Secret whose status record is gone. The
/// newest is current; the others stay accepted for a grace period from now,
/// since nobody can tell whether clients still use them.
fn adopt(settings: &Settings, observed: &Observed<'_>, status: &mut KeyRotationScheduleStatus, plan: &mut Plan) {
    let until = grace_end(observed.now, settings.grace);
    let newest = observed.in_secret.last().copied().unwrap_or(1);
    status.versions = observed
        .in_secret
        .iter()
        .rev()
        .map(|&v| {
            if v == newest {
                version(v, KeyVersionState::Current, observed.now)
            } else {
                KeyVersion { expires_at: Some(Time(until)), ..version(v, KeyVersionState::Previous, observed.now) }
            }
        })
        .collect();
    status.current_version = Some(newest);
    status.last_rotation_time = Some(Time(observed.now));
    status.rotation = (observed.in_secret.len() > 1).then_some(RotationProgress {
        target_version: newest,
        phase: RotationPhase::ConsumersRolled,
        started_at: Time(observed.now),
        slot: None,
    });
    if let Some(request) = observed.rotate_request {
        status.last_handled_rotate_request = Some(request.to_owned());
    }
    plan.steps.push(Step::Adopted { versions: observed.in_secret.iter().copied().collect() });
}

/// The end of a grace period starting `now`, rounded up to the second:
/// status times are written in whole seconds, and rounding down would cut
/// the grace period short.
fn grace_end(now: Timestamp, grace: SignedDuration) -> Timestamp {
    let end = now.checked_add(grace).unwrap_or(Timestamp::MAX);
    if end.subsec_nanosecond() == 0 {
        return end;
    }
    Timestamp::from_second(end.as_second().saturating_add(1)).unwrap_or(Timestamp::MAX)
}

/// Why a rotation is due now, if it is.
fn due(settings: &Settings, status: &KeyRotationScheduleStatus, observed: &Observed<'_>) -> Option<Trigger> {
    if observed.clients_changed {
        return Some(Trigger::ClientsChanged);
    }
    if settings.suspend {
        return None;
    }
    if observed.rotate_request.is_some_and(|r| status.last_handled_rotate_request.as_deref() != Some(r)) {
        return Some(Trigger::Requested);
    }
    let last = last_rotation(status, observed.now);
    settings.cadence.due_slot(Some(last), last, observed.now).map(|slot| Trigger::Schedule { slot })
}

fn last_rotation(status: &KeyRotationScheduleStatus, now: Timestamp) -> Timestamp {
    status
        .last_rotation_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| status.versions.iter().find(|v| v.state == KeyVersionState::Current).map(|v| v.created_at.0))
        .unwrap_or(now)
}

/// Prunes, sets `nextRotationTime` and when to wake.
fn finish(
    settings: &Settings,
    mut status: KeyRotationScheduleStatus,
    mut plan: Plan,
    now: Timestamp,
    took_step: bool,
) -> Plan {
    // Retired versions beyond keepVersions go, oldest first; accepted ones
    // never do.
    let mut pruned = Vec::new();
    while status.versions.len() > settings.keep {
        match status.versions.iter().rposition(|v| v.state == KeyVersionState::Retired) {
            Some(i) => pruned.push(status.versions.remove(i).version),
            None => break,
        }
    }
    if !pruned.is_empty() {
        plan.steps.push(Step::Pruned { versions: pruned });
    }
    let last = last_rotation(&status, now);
    status.next_rotation_time = if settings.suspend { None } else { settings.cadence.next_after(last, last).map(Time) };
    plan.wake_at = if took_step || !plan.steps.is_empty() {
        Some(now)
    } else {
        match status.rotation.as_ref().map(|r| r.phase) {
            None => status.next_rotation_time.as_ref().map(|t| t.0),
            Some(RotationPhase::ConsumersRolled) => status
                .versions
                .iter()
                .filter(|v| v.state == KeyVersionState::Previous)
                .filter_map(|v| v.expires_at.as_ref().map(|t| t.0))
                .min(),
            // Waiting for consumers: their status changes bring the next call.
            Some(_) => None,
        }
    };
    plan.status = status;
    plan
}

#[cfg(test)]
mod tests;
