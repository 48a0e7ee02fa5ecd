//! `FhirEndpoint`: one FHIR server behind an nginx gateway.

use super::auth::{ClientAccess, OAuthSpec};
use super::common::{NAME_PATTERN, conditions_schema};
use crate::validation::{DATABASE_NAME_PATTERN, HOST_PATTERN, IMAGE_PATTERN, PUBLIC_URL_PATTERN};
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The HAPI FHIR JPA server image used when `spec.server.image` is not set.
/// Pinned: an unpinned default would change what runs without a spec change.
pub const DEFAULT_SERVER_IMAGE: &str = "hapiproject/hapi:v7.4.0";

/// Desired state of one FHIR endpoint.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "fhiroperator.io",
    version = "v1alpha1",
    kind = "FhirEndpoint",
    namespaced,
    shortname = "fhir",
    category = "fhiroperator",
    status = "FhirEndpointStatus",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the endpoint serves as specified"
    ),
    printcolumn(
        name = "Tier",
        type_ = "string",
        json_path = ".spec.rateLimit.tier",
        description = "RateLimitTier applied by the gateway"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.server.replicas",
        description = "Desired FHIR server replicas"
    ),
    printcolumn(
        name = "Available",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas ready to serve"
    ),
    printcolumn(
        name = "Compliance",
        type_ = "string",
        json_path = ".status.complianceSummary",
        description = "HIPAA technical safeguards passing, of all measured"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 55").message("metadata.name must be a DNS label of at most 55 characters starting with a letter: it names the endpoint's Service and its children").field_path(".metadata.name")
)]
#[serde(rename_all = "camelCase")]
pub struct FhirEndpointSpec {
    /// The FHIR server container.
    #[serde(default)]
    pub server: ServerSpec,

    /// The address clients use, given to the FHIR server for the absolute
    /// URLs it writes (`Location`, `Bundle.link`). https only; no user
    /// information, query or fragment; its path must be the server's base
    /// path (`/fhir` for hapi, none for helios): the gateway does not
    /// rewrite paths. Default: `https://<name>.<namespace>.svc` plus the
    /// base path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = PUBLIC_URL_PATTERN))]
    pub public_url: Option<String>,

    /// External PostgreSQL database. Absent: the server's embedded database,
    /// allowed for trials but reported as not production-ready in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// TLS for the gateway. Absent: the operator issues and renews a
    /// self-signed certificate. The gateway always requires TLS 1.3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Client authentication at the gateway.
    #[serde(default, skip_serializing_if = "AuthSpec::is_empty")]
    pub auth: AuthSpec,

    /// The RateLimitTier the gateway enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitRef>,

    /// Who may reach the endpoint over the network. Default: nobody outside
    /// the endpoint's namespace.
    #[serde(default, skip_serializing_if = "AccessSpec::is_empty")]
    pub access: AccessSpec,

    /// Metrics scraping and generated alerts.
    #[serde(default)]
    pub monitoring: MonitoringSpec,
    /// The signed, retained audit trail of every request through the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
}

/// Where the audit trail goes and how long it is kept.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditSpec {
    /// Exactly one of `persistentVolumeClaim` and `s3`, as a BackupPolicy's.
    pub destination: super::BackupDestination,
    /// How long segments are kept, e.g. `6y` (the default: HIPAA's six
    /// years), `400d`. Only whole segments past it are pruned, and each
    /// pruning is recorded in the trail.
    #[serde(default = "default_audit_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h|d|w|y)$"))]
    pub retention: String,
    /// How often a segment and a signed checkpoint are written, e.g. `5m`.
    #[serde(default = "default_seal_every")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub seal_every: String,
    /// UTC hours when requests are expected, e.g. `07-19`; requests outside
    /// them alert (`FhirEndpointRequestsOutsideActiveHours`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{2}-[0-9]{2}$"))]
    pub active_hours: Option<String>,
    /// Distinct patients one client may touch within an hour before it
    /// alerts (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub distinct_patients_per_hour: Option<u32>,
}

fn default_audit_retention() -> String {
    "6y".into()
}

fn default_seal_every() -> String {
    "5m".into()
}

/// The FHIR server container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSpec {
    /// Which FHIR server the image holds: `hapi` (HAPI FHIR JPA server,
    /// configured through Spring's environment) or `helios` (the Helios
    /// FHIR Server, `hfs`, configured through `HFS_*`).
    #[serde(default)]
    pub flavor: ServerFlavor,

    /// Container image: `[registry[:port]/]path[:tag][@sha256:digest]`.
    /// With flavor `helios`, set it: the default is a HAPI image.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512), regex(pattern = IMAGE_PATTERN))]
    pub image: String,

    /// FHIR release served. Immutable: stored resources are release-specific.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("fhirVersion is immutable: stored FHIR resources are release-specific").reason(Reason::FieldValueInvalid))]
    pub fhir_version: FhirVersion,

    /// Number of FHIR server pods. More than one also gets a PodDisruptionBudget.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub replicas: i32,

    /// CPU and memory for the FHIR server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Extra environment variables for the FHIR server container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            flavor: ServerFlavor::default(),
            image: default_image(),
            fhir_version: FhirVersion::default(),
            replicas: default_replicas(),
            resources: None,
            env: Vec::new(),
        }
    }
}

fn default_image() -> String {
    DEFAULT_SERVER_IMAGE.to_owned()
}

fn default_replicas() -> i32 {
    1
}

/// The FHIR server implementation an image holds.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServerFlavor {
    #[default]
    Hapi,
    Helios,
}

impl ServerFlavor {
    /// The path the server serves FHIR under (what the gateway passes on).
    pub fn base_path(self) -> &'static str {
        match self {
            ServerFlavor::Hapi => "/fhir",
            ServerFlavor::Helios => "",
        }
    }
}

/// FHIR release.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FhirVersion {
    #[default]
    R4,
    R4B,
    R5,
}

/// External PostgreSQL database.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Host of the PostgreSQL server: a DNS-1123 subdomain (lowercase), an
    /// IPv4 address, or an IPv6 address written bare (`fd00::10`).
    #[schemars(length(min = 1, max = 253), regex(pattern = HOST_PATTERN))]
    pub host: String,
    #[serde(default = "default_pg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Database name: an ASCII letter or `_`, then letters, digits, `_`,
    /// `$` or `-`; at most 63 bytes.
    #[schemars(length(min = 1, max = 63), regex(pattern = DATABASE_NAME_PATTERN))]
    pub name: String,
    /// Secret in the endpoint's namespace with keys `username` and `password`.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub credentials_secret: String,
    /// libpq sslmode. Only `verify-full` and `verify-ca` pass the `tls`
    /// compliance check.
    #[serde(default)]
    pub ssl_mode: SslMode,
    /// Secret in the endpoint's namespace whose key `ca.crt` holds the CA
    /// certificate(s) that verify the database server (with `verify-ca` and
    /// `verify-full`). Mounted read-only into the FHIR server and backup Jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub ca_secret: Option<String>,
}

fn default_pg_port() -> i32 {
    5432
}

/// libpq `sslmode`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Require,
    VerifyCa,
    #[default]
    VerifyFull,
}

/// TLS for the gateway.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret in the endpoint's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub secret_name: String,
}

/// Client authentication at the gateway.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// KeyRotationSchedules (algorithm `api-key`, same namespace) whose keys
    /// the gateway accepts; each key maps to a client id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = NAME_PATTERN)), extend("x-kubernetes-list-type" = "set"))]
    pub api_keys: Vec<String>,
    /// Bearer tokens (JWT access tokens, SMART on FHIR backend services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthSpec>,
    /// Least privilege: the scopes of every client, API-key and OAuth
    /// alike. Once set, a client it does not name gets no access; without
    /// it, every authenticated client may do everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub clients: Vec<ClientAccess>,
}

impl AuthSpec {
    fn is_empty(&self) -> bool {
        self.api_keys.is_empty() && self.oauth.is_none() && self.clients.is_empty()
    }

    /// Whether the gateway checks every request with the token verifier
    /// (OAuth tokens or per-client scopes are configured).
    pub fn verified(&self) -> bool {
        self.oauth.is_some() || !self.clients.is_empty()
    }
}

/// Reference to a cluster-scoped RateLimitTier.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitRef {
    /// Name of the RateLimitTier.
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub tier: String,
}

/// Network access to the endpoint.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    /// Clients allowed in, besides pods of the endpoint's own namespace.
    /// Each entry is a NetworkPolicy peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub from: Vec<AccessPeer>,
}

impl AccessSpec {
    fn is_empty(&self) -> bool {
        self.from.is_empty()
    }
}

/// Pods allowed to reach the endpoint: those matching `podSelector` in the
/// namespaces matching `namespaceSelector` (either alone widens to all pods
/// of the matching namespaces, or to matching pods of the endpoint's own).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.namespaceSelector) || has(self.podSelector)").message("an access peer needs namespaceSelector, podSelector or both").reason(Reason::FieldValueRequired))]
pub struct AccessPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Metrics scraping and generated alerts.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create ServiceMonitor and PrometheusRule (when the cluster serves them).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Alert when the 99th percentile latency stays above this, e.g. `500ms`, `2s`.
    #[serde(default = "default_latency")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s)$"))]
    pub latency_p99: String,
    /// Alert when the share of 5xx responses stays above this (0 to 1).
    #[serde(default = "default_error_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub error_ratio: f64,
    /// Who may scrape the gateway's metrics port. Default: pods labelled
    /// `app.kubernetes.io/name: prometheus` in any namespace (what
    /// prometheus-operator labels its Prometheus pods).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub scrape_from: Vec<AccessPeer>,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            latency_p99: default_latency(),
            error_ratio: default_error_ratio(),
            scrape_from: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_latency() -> String {
    "500ms".to_owned()
}

fn default_error_ratio() -> f64 {
    0.01
}

/// Observed state, written by the operator: what an auditor reads.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FhirEndpointStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// In-cluster URL of the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Key versions the gateway accepts, per KeyRotationSchedule (versions
    /// only, never key material).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["schedule"]))]
    pub key_versions: Vec<KeyVersionsInForce>,
    /// One entry per HIPAA technical safeguard the operator measures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub compliance: Vec<ComplianceEntry>,
    /// Passing entries of `compliance`, of all: e.g. `5/6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compliance_summary: Option<String>,
    /// The signing keys in force per token issuer (key ids only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["issuer"]))]
    pub token_issuers: Vec<TokenIssuerStatus>,
    /// The audit trail: its public key and what the operator last verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditStatus>,
}

/// The audit trail as the operator last read and verified it.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuditStatus {
    /// The Ed25519 public key checkpoints are signed with (base64, raw 32
    /// bytes); also in the gateway ConfigMap as `audit-public-key.pem`.
    pub public_key: String,
    pub key_id: String,
    /// `s3 bucket ...` or `PersistentVolumeClaim/<name>`.
    pub destination: String,
    /// When the operator last verified the trail (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<String>,
    /// The newest checkpoint's time (RFC 3339) and the records verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<String>,
    #[serde(default)]
    pub records: u64,
    /// What verification found wrong, naming the segment and record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub problem: String,
}

/// The keys the gateway verifies one issuer's tokens with.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenIssuerStatus {
    pub issuer: String,
    /// `ConfigMap/<name>` or the JWKS URL.
    pub source: String,
    /// `kid` of every key handed to the gateway.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<String>,
    /// When the keys were read or fetched (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<String>,
    /// Why the last read or fetch failed; the keys above stay in force.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// Key versions in force for one schedule.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct KeyVersionsInForce {
    /// The KeyRotationSchedule.
    pub schedule: String,
    /// Versions the gateway accepts, newest first.
    pub versions: Vec<i64>,
    /// Identifies the accepted key set (versions and when each was
    /// issued); the pod template carries it, so a change rolls the pods.
    pub fingerprint: String,
}

/// One safeguard's measurement.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ComplianceEntry {
    /// `tls`, `networkIsolation`, `keyRotation`, `backup`, `auditLog`,
    /// `database` or `accessControl`.
    pub name: ComplianceCheck,
    /// The 45 CFR 164.312 paragraph it supports, e.g. `164.312(e)(1)`.
    pub safeguard: String,
    pub status: ComplianceStatus,
    /// CamelCase reason for the status.
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Objects and settings that prove the status, e.g. `NetworkPolicy/ns/name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<String>,
}

/// The safeguards measured for every endpoint.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum ComplianceCheck {
    Tls,
    NetworkIsolation,
    KeyRotation,
    Backup,
    AuditLog,
    Database,
    AccessControl,
}

/// Outcome of one compliance check. `Unknown`: not yet measurable.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComplianceStatus {
    Pass,
    Fail,
    Unknown,
}
