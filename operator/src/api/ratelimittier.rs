//! `RateLimitTier`: a cluster-wide service level for FHIR endpoints.

use super::common::{ObjectRef, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A named rate limit that endpoints reference by `spec.rateLimit.tier`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fhiroperator.io",
    version = "v1alpha1",
    kind = "RateLimitTier",
    shortname = "rlt",
    category = "fhiroperator",
    status = "RateLimitTierStatus",
    derive = "PartialEq",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "RPS",
        type_ = "integer",
        json_path = ".spec.requestsPerSecond",
        description = "Sustained requests per second per key"
    ),
    printcolumn(name = "Burst", type_ = "integer", json_path = ".spec.burst"),
    printcolumn(name = "Key", type_ = "string", json_path = ".spec.key"),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.endpointCount",
        description = "FhirEndpoints using this tier"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitTierSpec {
    /// Sustained requests per second allowed per key (client or source IP).
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: i32,
    /// Requests allowed above the sustained rate before 429s.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: i32,
    /// A separate limit for reads (GET, HEAD, OPTIONS). Absent: the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<MethodLimit>,
    /// A separate limit for writes (POST, PUT, PATCH, DELETE), which cost
    /// more on a FHIR server. Absent: the tier's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<MethodLimit>,
    /// Largest request body accepted (413 beyond), as a quantity: `512Ki`, `10Mi`.
    #[serde(default = "default_body_size")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(Ki|Mi|Gi)?$"))]
    pub max_request_body_size: String,
    /// What a limit counts per: the API key's client id, or the source IP.
    #[serde(default)]
    pub key: RateLimitKey,
}

fn default_body_size() -> String {
    "1Mi".to_owned()
}

/// A rate for one class of requests.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MethodLimit {
    #[schemars(range(min = 1, max = 100000))]
    pub requests_per_second: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub burst: i32,
}

/// What a rate limit is counted per.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RateLimitKey {
    /// The client id that the request's API key maps to.
    #[default]
    #[serde(rename = "client")]
    Client,
    /// The request's source address.
    #[serde(rename = "sourceIP")]
    SourceIp,
}

/// Observed state.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitTierStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// How many FhirEndpoints use this tier.
    #[serde(default)]
    pub endpoint_count: i32,
    /// The endpoints using this tier, sorted, at most 50 (see `endpointCount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ObjectRef>,
}
