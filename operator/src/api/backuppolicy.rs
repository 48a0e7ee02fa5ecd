//! `BackupPolicy`: scheduled, encrypted, retained and restore-tested backups
//! of one endpoint's database.

use super::common::{CRON_PATTERN, DURATION_PATTERN, NAME_PATTERN, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired backups of one FhirEndpoint's PostgreSQL database.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fhiroperator.io",
    version = "v1alpha1",
    kind = "BackupPolicy",
    namespaced,
    shortname = "bkp",
    category = "fhiroperator",
    status = "BackupPolicyStatus",
    derive = "PartialEq",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoint"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Last Backup", type_ = "date", json_path = ".status.lastSuccessfulBackup.time"),
    printcolumn(name = "Last Restore", type_ = "date", json_path = ".status.lastVerifiedRestore.time"),
    printcolumn(name = "Suspended", type_ = "boolean", json_path = ".spec.suspend", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicySpec {
    /// The FhirEndpoint (same namespace) whose database is backed up.
    /// Immutable: history belongs to one database.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("endpoint is immutable; create a new policy instead"))]
    pub endpoint: String,
    /// When to back up: five-field cron, UTC.
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: String,
    /// Where backups are written.
    pub destination: BackupDestination,
    /// Encryption of every backup.
    pub encryption: BackupEncryption,
    /// Which backups are kept.
    #[serde(default)]
    pub retention: Retention,
    /// Restore the latest backup into a scratch database and check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_drill: Option<RestoreDrill>,
    /// Pause scheduling (a running backup finishes).
    #[serde(default)]
    pub suspend: bool,
}

/// Exactly one destination.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.persistentVolumeClaim) != has(self.s3)").message("exactly one of destination.persistentVolumeClaim or destination.s3 must be set").reason(Reason::FieldValueRequired))]
pub struct BackupDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PvcDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Destination>,
}

impl BackupDestination {
    /// The `fhir-operator` agent's destination flags (`--dir`, or
    /// `--s3-bucket` and the rest; never credentials): `mount` is where the
    /// claim is mounted.
    pub fn agent_flags(&self, mount: &str) -> Vec<String> {
        if let Some(pvc) = &self.persistent_volume_claim {
            let dir = if pvc.path.is_empty() { mount.to_owned() } else { format!("{mount}/{}", pvc.path) };
            return vec![format!("--dir={dir}")];
        }
        let Some(s3) = &self.s3 else { return Vec::new() };
        let mut args = vec![format!("--s3-bucket={}", s3.bucket)];
        if !s3.prefix.is_empty() {
            args.push(format!("--s3-prefix={}", s3.prefix));
        }
        if let Some(endpoint) = &s3.endpoint {
            args.push(format!("--s3-endpoint={endpoint}"));
        }
        if let Some(region) = &s3.region {
            args.push(format!("--s3-region={region}"));
        }
        args
    }
}

/// A PersistentVolumeClaim in the policy's namespace.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcDestination {
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub claim_name: String,
    /// Directory inside the volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = r"^[^/.][^\0]*$"))]
    pub path: String,
}

/// An S3-compatible bucket.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix for this policy's objects.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
    /// Endpoint URL of an S3-compatible service; absent: AWS for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Secret with keys `accessKeyId` and `secretAccessKey`.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credentials_secret: String,
}

/// Encryption settings.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupEncryption {
    /// A KeyRotationSchedule of algorithm `aes-256` in the same namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub key_schedule: String,
}

/// Retention: a backup is pruned when either rule drops it, but the newest
/// successful backup is never pruned.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep at most this many successful backups.
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,
    /// Prune backups older than this, e.g. `30d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub max_age: Option<String>,
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_last: default_keep_last(), max_age: None }
    }
}

fn default_keep_last() -> i32 {
    7
}

/// Scheduled restore tests.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreDrill {
    /// When to restore the latest backup and verify it: cron, UTC.
    #[schemars(regex(pattern = CRON_PATTERN))]
    pub schedule: String,
}

/// Observed state: the backup record an auditor reads.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `LastBackupSucceeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<BackupRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_backup: Option<BackupRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_restore: Option<RestoreRecord>,
    /// The last restore drill that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failed_restore: Option<FailedRestore>,
    /// The latest restore drill slot handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill_schedule_time: Option<Time>,
    /// The next restore drill slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_drill_schedule_time: Option<Time>,
    /// The value of the `fhiroperator.io/backup-now` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_backup_request: Option<String>,
    /// The most recent runs, newest first, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub history: Vec<BackupRecord>,
}

/// One backup run.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// The Job that ran it.
    pub job: String,
    /// The scheduled slot.
    pub time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    pub outcome: BackupOutcome,
    /// Object or file name of the backup, when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// SHA-256 of the encrypted backup, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Version of the encryption key used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<i64>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Outcome of a backup run.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupOutcome {
    Running,
    Succeeded,
    Failed,
}

/// One verified restore.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreRecord {
    pub time: Time,
    /// The backup restored.
    pub backup: String,
    /// Measured wall-clock time of the restore, in seconds.
    pub duration_seconds: f64,
    pub job: String,
}

/// One failed restore drill.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailedRestore {
    pub time: Time,
    pub job: String,
    pub message: String,
}
