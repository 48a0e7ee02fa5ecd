//! Conditions: set one, keeping `lastTransitionTime` unless the status
//! really changes, so that a steady resource's status never churns.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Where "now" comes from: the system clock in the operator, a fixed or
/// advancing one in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// How long to really wait for `wait` to pass on this clock (a requeue
    /// is a real-time wait).
    fn real_wait(&self, wait: std::time::Duration) -> std::time::Duration {
        wait
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that runs `rate` times faster than real time from `origin`
/// (where it equals real time): for tests of cron schedules. Processes
/// given the same origin and rate agree on the time.
#[derive(Debug, Clone, Copy)]
pub struct FastClock {
    pub origin: Timestamp,
    pub rate: u32,
}

impl Clock for FastClock {
    fn now(&self) -> Timestamp {
        let real = Timestamp::now();
        let elapsed = real.duration_since(self.origin);
        let fast = elapsed.checked_mul(i32::try_from(self.rate).unwrap_or(i32::MAX)).unwrap_or(elapsed);
        self.origin.checked_add(fast).unwrap_or(real)
    }

    fn real_wait(&self, wait: std::time::Duration) -> std::time::Duration {
        wait / self.rate.max(1)
    }
}

/// A condition to set, without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired<'a> {
    pub type_: &'a str,
    pub status: bool,
    pub reason: &'a str,
    pub message: String,
}

impl<'a> Desired<'a> {
    pub fn new(type_: &'a str, status: bool, reason: &'a str, message: impl Into<String>) -> Self {
        Self { type_, status, reason, message: message.into() }
    }
}

/// Sets `desired` in `conditions`. `lastTransitionTime` moves to `now` only
/// when the condition is new or its status flips; reason, message and
/// observedGeneration are updated in place.
///
/// An empty message becomes the reason: Kubernetes 1.20 refuses a condition
/// whose message is the empty string (it reads it as null, and the field is
/// required), so every condition says something.
pub fn set(conditions: &mut Vec<Condition>, mut desired: Desired<'_>, generation: Option<i64>, now: Timestamp) {
    if desired.message.is_empty() {
        desired.message = desired.reason.to_owned();
    }
    let status = if desired.status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = desired.reason.to_owned();
            existing.message = desired.message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: desired.type_.to_owned(),
            status,
            reason: desired.reason.to_owned(),
            message: desired.message,
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Whether condition `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn a_fast_clock_waits_its_rate_times_less_in_real_time() {
        let wait = std::time::Duration::from_secs(1800);
        assert_eq!(SystemClock.real_wait(wait), wait);
        let fast = FastClock { origin: at(0), rate: 60 };
        assert_eq!(fast.real_wait(wait), std::time::Duration::from_secs(30));
        assert_eq!(FastClock { origin: at(0), rate: 0 }.real_wait(wait), wait);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conditions = Vec::new();
        set(&mut conditions, Desired::new("Ready", false, "Progressing", "rolling out"), Some(1), at(0));
        assert_eq!(conditions[0].last_transition_time, Time(at(0)));

        set(&mut conditions, Desired::new("Ready", false, "Waiting", "still rolling out"), Some(2), at(10));
        assert_eq!(conditions[0].last_transition_time, Time(at(0)), "same status keeps the time");
        assert_eq!(conditions[0].reason, "Waiting");
        assert_eq!(conditions[0].observed_generation, Some(2));

        set(&mut conditions, Desired::new("Ready", true, "Available", "serving"), Some(2), at(20));
        assert_eq!(conditions[0].last_transition_time, Time(at(20)), "a flip moves the time");
        assert!(is_true(&conditions, "Ready"));
    }

    #[test]
    fn setting_the_same_condition_twice_changes_nothing() {
        let mut once = Vec::new();
        set(&mut once, Desired::new("Degraded", false, "AsExpected", ""), Some(1), at(0));
        let mut twice = once.clone();
        set(&mut twice, Desired::new("Degraded", false, "AsExpected", ""), Some(1), at(99));
        assert_eq!(once, twice);
    }

    #[test]
    fn a_condition_always_has_a_message() {
        let mut conditions = Vec::new();
        set(&mut conditions, Desired::new("Degraded", false, "AsExpected", ""), None, at(0));
        assert_eq!(conditions[0].message, "AsExpected");
    }

    #[test]
    fn conditions_keep_their_order() {
        let mut conditions = Vec::new();
        for t in ["Ready", "Progressing", "Degraded"] {
            set(&mut conditions, Desired::new(t, false, "Init", ""), None, at(0));
        }
        set(&mut conditions, Desired::new("Progressing", true, "Rollout", ""), None, at(1));
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Ready", "Progressing", "Degraded"]);
    }
}
