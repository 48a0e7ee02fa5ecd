//! Types and schema fragments shared by several kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Go-style duration with whole units, as Kubernetes users write them:
/// `30s`, `15m`, `24h`, `90d`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(s|m|h|d))+$";

/// A five-field cron expression (minute hour day-of-month month day-of-week,
/// always UTC) or one of the `@hourly`-style shorthands. The schema checks
/// the shape; the operator parses the fields and names what is wrong.
pub const CRON_PATTERN: &str =
    r"^(@(yearly|annually|monthly|weekly|daily|hourly)|[^\s]+\s+[^\s]+\s+[^\s]+\s+[^\s]+\s+[^\s]+)$";

/// A name of another object in the same namespace (DNS-1123 subdomain).
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Adds the list-map markers to a `conditions` schema: entries are keyed by
/// `type`, so server-side apply merges them per condition type.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

/// Condition types shared by every kind.
pub mod condition {
    /// True when the resource's children exist as desired and are serving;
    /// False with a reason (e.g. `InvalidSpec`) otherwise.
    pub const READY: &str = "Ready";
    /// True while the operator is moving the children towards the spec
    /// (a rollout, a rotation step, a running backup).
    pub const PROGRESSING: &str = "Progressing";
    /// True when something the resource depends on is missing or failing,
    /// while the rest keeps serving (an optional API not served, a missing tier).
    pub const DEGRADED: &str = "Degraded";
}

/// Reasons (CamelCase) used on conditions and events by every kind.
pub mod reason {
    /// The spec failed validation; the message names the field.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// One object that consumes or is consumed by another, named for status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// The object's kind, e.g. `FhirEndpoint`.
    pub kind: String,
    /// Namespace, empty for cluster-scoped objects.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
}
