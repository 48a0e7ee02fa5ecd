//! What every controller that runs Jobs shares: their labels, where their
//! containers leave a result, and how a finished Job is read.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;

use crate::meta::{MANAGED_BY, MANAGED_BY_LABEL};

/// Where a Job's container writes its result (its termination message).
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// Labels of a Job the operator runs: managed by it, its `component`,
/// and `owner_label` naming what it runs for.
pub fn labels(component: &str, owner_label: (&str, &str)) -> BTreeMap<String, String> {
    [
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "fhir-operator".to_owned()),
        ("app.kubernetes.io/component".to_owned(), component.to_owned()),
        (owner_label.0.to_owned(), owner_label.1.to_owned()),
    ]
    .into()
}

/// `(succeeded, when, the Job's own message)` of a finished Job.
pub fn finished(job: &Job) -> Option<(bool, Option<Timestamp>, String)> {
    let status = job.status.as_ref()?;
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")?;
    let at =
        status.completion_time.as_ref().map(|t| t.0).or_else(|| condition.last_transition_time.as_ref().map(|t| t.0));
    let message = [condition.reason.as_deref(), condition.message.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
    Some((condition.type_ == "Complete", at, message))
}
