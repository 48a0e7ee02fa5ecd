//! `KeyRotationSchedule`: a set of keys the operator generates, keeps in one
//! Secret and rotates.

use super::common::{CRON_PATTERN, DURATION_PATTERN, NAME_PATTERN, ObjectRef, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired keys and their rotation.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fhiroperator.io",
    version = "v1alpha1",
    kind = "KeyRotationSchedule",
    namespaced,
    shortname = "krs",
    category = "fhiroperator",
    status = "KeyRotationScheduleStatus",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the keys exist and rotate on schedule"
    ),
    printcolumn(name = "Algorithm", type_ = "string", json_path = ".spec.algorithm"),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.currentVersion",
        description = "Current key version"
    ),
    printcolumn(name = "Last Rotation", type_ = "date", json_path = ".status.lastRotationTime"),
    printcolumn(name = "Next Rotation", type_ = "string", json_path = ".status.nextRotationTime", priority = 1),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new("has(self.schedule) != has(self.interval)").message("exactly one of spec.schedule or spec.interval must be set").reason(Reason::FieldValueRequired),
    validation = Rule::new("self.algorithm == 'api-key' ? (has(self.clients) && size(self.clients) > 0) : (!has(self.clients) || size(self.clients) == 0)").message("spec.clients is required for algorithm api-key and not allowed for any other algorithm").field_path(".clients").reason(Reason::FieldValueInvalid)
)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationScheduleSpec {
    /// What kind of key to generate. Immutable: consumers depend on the format.
    #[x_kube(validation = Rule::new("self == oldSelf").message("algorithm is immutable; create a new schedule instead"))]
    pub algorithm: KeyAlgorithm,

    /// Client ids that each get their own key (algorithm `api-key` only).
    /// The gateway logs the client id with every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")), extend("x-kubernetes-list-type" = "set"))]
    pub clients: Vec<String>,

    /// Rotate at the times of this cron expression (UTC). One of
    /// `schedule` or `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: Option<String>,

    /// Rotate this long after the previous rotation, e.g. `720h`, `90d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,

    /// How long the previous version stays valid after a rotation.
    #[serde(default = "default_grace")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub grace_period: String,

    /// Versions kept in the Secret, the current one included.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 2, max = 10))]
    pub keep_versions: i32,

    /// Stop rotating (keys already issued stay valid until they expire).
    #[serde(default)]
    pub suspend: bool,

    /// Name of the Secret holding the keys. Default: `<name>-keys`.
    /// Immutable: consumers mount it by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("secretName is immutable"))]
    pub secret_name: Option<String>,
}

fn default_grace() -> String {
    "24h".to_owned()
}

fn default_keep() -> i32 {
    3
}

/// Key algorithm.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// A random 256-bit token per client, for the gateway's `X-API-Key`.
    ApiKey,
    /// A random 256-bit HMAC-SHA256 key.
    HmacSha256,
    /// A random 256-bit data encryption key (used by backups).
    #[serde(rename = "aes-256")]
    Aes256,
    /// An ECDSA P-256 signing key pair; public keys are also published as a
    /// JWKS ConfigMap.
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
}

/// Observed state. Never holds key material.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyRotationScheduleStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The version new consumers use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// Versions held in the Secret, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["version"]))]
    pub versions: Vec<KeyVersion>,
    /// Objects that use these keys and are rolled at each rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ObjectRef>,
    /// The rotation under way, recorded after each of its steps, so that a
    /// restart resumes it instead of starting another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationProgress>,
    /// The value of the `fhiroperator.io/rotate` annotation that the last
    /// manual rotation answered; a different value asks for another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_rotate_request: Option<String>,
}

/// One key version (metadata only).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyVersion {
    pub version: i64,
    pub created_at: Time,
    /// When the version stops being accepted; absent while it is pending or
    /// current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    pub state: KeyVersionState,
}

/// Where a version is in its life.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyVersionState {
    /// In the Secret and accepted by consumers, not yet handed to clients:
    /// consumers are being rolled to accept it.
    Pending,
    /// The version clients use (`current.*` entries of the Secret).
    Current,
    /// The version before the current one: still accepted until `expiresAt`.
    Previous,
    /// No longer accepted; kept in the Secret (up to `keepVersions`) so
    /// that data encrypted or signed with it can still be read.
    Retired,
}

impl KeyVersionState {
    /// Whether consumers accept keys of this version.
    pub fn accepted(self) -> bool {
        self != KeyVersionState::Retired
    }
}

/// A rotation in progress.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RotationProgress {
    /// The version this rotation creates.
    pub target_version: i64,
    pub phase: RotationPhase,
    pub started_at: Time,
    /// The scheduled time this rotation serves; absent for a rotation asked
    /// for by hand or by a change of `spec.clients`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Time>,
}

/// Steps of a rotation, in order. Each is recorded once done.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationPhase {
    /// The new version is in the Secret beside the old one.
    Created,
    /// Every consumer was rolled to accept the new version.
    ConsumersRolled,
    /// The grace period ended, the old version was removed; consumers roll again.
    Retired,
}
