//! `FhirEndpoint.spec.auth.oauth` and `.clients`: OAuth 2.0 bearer tokens
//! (SMART on FHIR backend services) and least privilege for every client.

use super::common::NAME_PATTERN;
use serde::{Deserialize, Serialize};

/// https URL with a host; no user information or fragment. The operator
/// parses it fully.
pub const HTTPS_URL_PATTERN: &str = r"^https://[^/?#@\s]+(/[^#@\s]*)?$";
/// A client id: what the gateway logs, passes upstream and rate-limits by.
pub const CLIENT_ID_PATTERN: &str = r"^[A-Za-z0-9._-]{1,128}$";

/// Bearer tokens (JWT access tokens) the gateway accepts.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OAuthSpec {
    /// Token issuers; a token is checked against the one its `iss` names.
    #[schemars(length(min = 1, max = 8), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["issuer"]))]
    pub issuers: Vec<IssuerSpec>,
    /// Served without credentials at `<base>/.well-known/smart-configuration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smart_configuration: Option<SmartConfigurationSpec>,
}

/// One token issuer.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IssuerSpec {
    /// Must equal the token's `iss`, byte for byte.
    #[schemars(length(min = 1, max = 512), regex(pattern = HTTPS_URL_PATTERN))]
    pub issuer: String,
    /// The token's `aud` must contain one of these (usually the endpoint's
    /// FHIR base URL).
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 512)), extend("x-kubernetes-list-type" = "set"))]
    pub audiences: Vec<String>,
    /// Where the issuer's public signing keys come from.
    pub jwks: JwksSource,
    /// Signature algorithms accepted; never `none` or an HMAC (`HS*`).
    #[serde(default = "default_algorithms")]
    #[schemars(length(min = 1, max = 9), extend("x-kubernetes-list-type" = "set"))]
    pub algorithms: Vec<SigningAlgorithm>,
    /// The claim naming the client; a token without it falls back to `azp`.
    #[serde(default = "default_client_claim")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.-]*$"))]
    pub client_claim: String,
}

fn default_algorithms() -> Vec<SigningAlgorithm> {
    vec![SigningAlgorithm::RS256, SigningAlgorithm::ES256]
}

fn default_client_claim() -> String {
    "client_id".into()
}

/// Asymmetric JWS algorithms.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[allow(clippy::upper_case_acronyms)]
pub enum SigningAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

/// The issuer's JSON Web Key Set: exactly one of `configMap` and `uri`.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct JwksSource {
    /// A key of a ConfigMap in the endpoint's namespace holding the JWKS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
    /// An https URL the operator (never the pod: its egress stays denied)
    /// fetches the JWKS from, every `refreshInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = HTTPS_URL_PATTERN))]
    pub uri: Option<String>,
    /// How often the operator fetches `uri` again, e.g. `5m` (from 30s to 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub refresh_interval: Option<String>,
}

/// One key of a ConfigMap.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    #[schemars(length(min = 1, max = 253), regex(pattern = NAME_PATTERN))]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The SMART configuration document clients discover endpoints from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SmartConfigurationSpec {
    #[schemars(length(min = 1, max = 1024), regex(pattern = HTTPS_URL_PATTERN))]
    pub token_endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = HTTPS_URL_PATTERN))]
    pub authorization_endpoint: Option<String>,
    /// SMART capabilities, e.g. `client-confidential-asymmetric`, `permission-v2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$")), extend("x-kubernetes-list-type" = "set"))]
    pub capabilities: Vec<String>,
}

/// What one client (an API-key client or an OAuth client) may do.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientAccess {
    /// The client id: the API key's client, or the token's client claim.
    #[schemars(regex(pattern = CLIENT_ID_PATTERN))]
    pub id: String,
    /// SMART scopes, e.g. `system/Patient.rs` (v2) or `system/Patient.read`
    /// (v1). Only `system/` scopes: see the README's SMART on FHIR section.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 128)), extend("x-kubernetes-list-type" = "set"))]
    pub scopes: Vec<String>,
}
