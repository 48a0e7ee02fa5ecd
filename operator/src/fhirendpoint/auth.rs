//! `spec.auth.oauth` and `spec.auth.clients` → what the gateway's token
//! verifier is given ([`AuthConfig`]) and the SMART configuration document.
//! Pure: the reconciler reads the issuers' key sets and passes them in.

use std::collections::BTreeMap;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use serde_json::json;

use super::validate::InvalidSpec;
use crate::api::{AuthSpec, IssuerSpec};
use crate::gateway_auth::{AuthConfig, IssuerConfig, KeyHintsConfig};
use crate::smart::Scope;

/// Key of the verifier's configuration in the gateway's ConfigMap.
pub const AUTH_CONFIG_KEY: &str = "auth.json";
/// Key of the SMART configuration document in the gateway's ConfigMap.
pub const SMART_CONFIGURATION_KEY: &str = "smart-configuration.json";
/// How often a JWKS `uri` is fetched again when `refreshInterval` is unset.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// Largest JWKS accepted, from a ConfigMap or a URL.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Where an issuer's keys come from, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ConfigMap { name: String, key: String },
    Uri { url: url::Url, refresh: Duration },
}

impl KeySource {
    /// For status: `ConfigMap/<name>` or the URL.
    pub fn describe(&self) -> String {
        match self {
            KeySource::ConfigMap { name, key } => format!("ConfigMap/{name} ({key})"),
            KeySource::Uri { url, .. } => url.to_string(),
        }
    }
}

/// The auth part of a validated endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    /// Issuers in spec order, each with where its keys come from.
    pub issuers: Vec<(IssuerSpec, KeySource)>,
    /// `None` without `spec.auth.clients`.
    pub clients: Option<BTreeMap<String, Vec<Scope>>>,
}

impl Auth {
    /// Whether some issuer's keys come from a URL (and a key hint helps).
    pub fn refreshable(&self) -> bool {
        self.issuers.iter().any(|(_, source)| matches!(source, KeySource::Uri { .. }))
    }
}

/// Where the gateways' verifiers report a token signed with a key they do
/// not know (`fhir-operator run --key-hints-*`), so that the operator
/// fetches that issuer's keys at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHints {
    /// What the verifiers call.
    pub url: url::Url,
    /// The port the operator listens on: what the gateway pods may reach.
    pub port: u16,
    /// The operator's pods, as a NetworkPolicy peer (namespace, labels);
    /// `None`: any address (an operator running outside the cluster).
    pub operator_pods: Option<(String, BTreeMap<String, String>)>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec { field: field.into(), message: message.into() }
}

fn https_url(field: &str, text: &str) -> Result<url::Url, InvalidSpec> {
    let url = url::Url::parse(text).map_err(|e| invalid(field, format!("{text:?} is not a URL: {e}")))?;
    if url.scheme() != "https" || url.host().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(field, format!("{text:?} must be an https URL with a host and no user information")));
    }
    if url.fragment().is_some() {
        return Err(invalid(field, format!("{text:?} must not have a fragment")));
    }
    Ok(url)
}

/// `30s`, `5m`, `1h` → a duration from 30 s to 24 h.
fn refresh_interval(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (30..=86_400).contains(&seconds).then(|| Duration::from_secs(seconds))
}

/// Checks `spec.auth` beyond what the schema says. `None` when the gateway
/// needs no verifier (API keys only, every key granting everything).
pub fn check(auth: &AuthSpec) -> Result<Option<Auth>, InvalidSpec> {
    if !auth.verified() {
        return Ok(None);
    }
    let mut issuers = Vec::new();
    if let Some(oauth) = &auth.oauth {
        if oauth.issuers.is_empty() {
            return Err(invalid("spec.auth.oauth.issuers", "needs at least one issuer"));
        }
        for (i, issuer) in oauth.issuers.iter().enumerate() {
            let field = format!("spec.auth.oauth.issuers[{i}]");
            https_url(&format!("{field}.issuer"), &issuer.issuer)?;
            if oauth.issuers[..i].iter().any(|other| other.issuer == issuer.issuer) {
                return Err(invalid(format!("{field}.issuer"), format!("{:?} is listed twice", issuer.issuer)));
            }
            if issuer.audiences.is_empty() {
                return Err(invalid(format!("{field}.audiences"), "needs at least one audience"));
            }
            if issuer.algorithms.is_empty() {
                return Err(invalid(format!("{field}.algorithms"), "needs at least one algorithm"));
            }
            let claim = &issuer.client_claim;
            if claim.is_empty() || !claim.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
                return Err(invalid(format!("{field}.clientClaim"), format!("{claim:?} is not a claim name")));
            }
            let source = match (&issuer.jwks.config_map, &issuer.jwks.uri) {
                (Some(cm), None) => {
                    crate::validation::dns_subdomain(&cm.name)
                        .map_err(|e| invalid(format!("{field}.jwks.configMap.name"), e))?;
                    KeySource::ConfigMap { name: cm.name.clone(), key: cm.key.clone() }
                }
                (None, Some(uri)) => {
                    let url = https_url(&format!("{field}.jwks.uri"), uri)?;
                    let refresh = match &issuer.jwks.refresh_interval {
                        None => DEFAULT_JWKS_REFRESH,
                        Some(text) => refresh_interval(text).ok_or_else(|| {
                            invalid(
                                format!("{field}.jwks.refreshInterval"),
                                format!("{text:?} is not a duration from 30s to 24h such as 5m"),
                            )
                        })?,
                    };
                    KeySource::Uri { url, refresh }
                }
                _ => return Err(invalid(format!("{field}.jwks"), "needs exactly one of configMap and uri")),
            };
            issuers.push((issuer.clone(), source));
        }
        if let Some(smart) = &oauth.smart_configuration {
            https_url("spec.auth.oauth.smartConfiguration.tokenEndpoint", &smart.token_endpoint)?;
            if let Some(authorize) = &smart.authorization_endpoint {
                https_url("spec.auth.oauth.smartConfiguration.authorizationEndpoint", authorize)?;
            }
        }
    }
    let clients = if auth.clients.is_empty() {
        None
    } else {
        let mut clients = BTreeMap::new();
        for (i, client) in auth.clients.iter().enumerate() {
            let field = format!("spec.auth.clients[{i}]");
            if client.id.is_empty()
                || client.id.len() > 128
                || !client.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("{:?} must be 1 to 128 of A-Z a-z 0-9 . _ -", client.id),
                ));
            }
            if client.scopes.is_empty() {
                return Err(invalid(format!("{field}.scopes"), "needs at least one scope"));
            }
            let scopes = client
                .scopes
                .iter()
                .enumerate()
                .map(|(j, s)| Scope::parse(s).map_err(|e| invalid(format!("{field}.scopes[{j}]"), e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            if clients.insert(client.id.clone(), scopes).is_some() {
                return Err(invalid(format!("{field}.id"), format!("{:?} is listed twice", client.id)));
            }
        }
        Some(clients)
    };
    Ok(Some(Auth { issuers, clients }))
}

/// Parses a JWKS for the gateway: JSON, at most [`MAX_JWKS_BYTES`], only
/// public asymmetric keys (RSA, EC, OKP), each with a `kid`. Returns the
/// set and the key ids.
pub fn parse_jwks(bytes: &[u8]) -> Result<(JwkSet, Vec<String>), String> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
    }
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    if set.keys.is_empty() {
        return Err("the key set holds no key".into());
    }
    let mut ids = Vec::new();
    for (i, key) in set.keys.iter().enumerate() {
        if matches!(key.algorithm, AlgorithmParameters::OctetKey(_)) {
            return Err(format!("key {i} is a symmetric (oct) key: only public keys are accepted"));
        }
        let raw: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
        if raw["keys"][i].get("d").is_some() {
            return Err(format!("key {i} holds a private key (d): publish only the public half"));
        }
        match &key.common.key_id {
            Some(kid) if !kid.is_empty() => ids.push(kid.clone()),
            _ => return Err(format!("key {i} has no kid")),
        }
    }
    Ok((set, ids))
}

/// The verifier's configuration: `jwks` holds each issuer's key set, in the
/// order of `auth.issuers` (an empty set while none could be read: every
/// token of that issuer is refused).
/// `key_hints`: where this endpoint's verifier reports unknown keys (used
/// only when some issuer's keys come from a URL).
pub fn auth_config(auth: &Auth, base_path: &str, jwks: &[JwkSet], key_hints: Option<KeyHintsConfig>) -> AuthConfig {
    AuthConfig {
        key_hints: key_hints.filter(|_| auth.refreshable()),
        base_path: if base_path.is_empty() { "/".into() } else { base_path.into() },
        clients: auth.clients.as_ref().map(|clients| {
            clients.iter().map(|(id, scopes)| (id.clone(), scopes.iter().map(Scope::to_string).collect())).collect()
        }),
        issuers: auth
            .issuers
            .iter()
            .zip(jwks.iter().cloned().chain(std::iter::repeat(JwkSet { keys: Vec::new() })))
            .map(|((spec, source), jwks)| IssuerConfig {
                refreshable: matches!(source, KeySource::Uri { .. }),
                issuer: spec.issuer.clone(),
                audiences: spec.audiences.clone(),
                algorithms: spec.algorithms.clone(),
                client_claim: spec.client_claim.clone(),
                jwks,
            })
            .collect(),
    }
}

/// The SMART configuration document (`.well-known/smart-configuration`),
/// serialized, or `None` without `spec.auth.oauth.smartConfiguration`.
pub fn smart_configuration(auth: &AuthSpec) -> Option<String> {
    let oauth = auth.oauth.as_ref()?;
    let smart = oauth.smart_configuration.as_ref()?;
    let mut doc = json!({
        "token_endpoint": smart.token_endpoint,
        "capabilities": smart.capabilities,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": ["system/*.cruds", "system/*.rs"],
    });
    if let Some(issuer) = oauth.issuers.first() {
        doc["issuer"] = json!(issuer.issuer);
        if let Some(uri) = &issuer.jwks.uri {
            doc["jwks_uri"] = json!(uri);
        }
    }
    if let Some(authorize) = &smart.authorization_endpoint {
        doc["authorization_endpoint"] = json!(authorize);
        doc["grant_types_supported"] = json!(["authorization_code", "client_credentials"]);
        doc["response_types_supported"] = json!(["code"]);
        doc["code_challenge_methods_supported"] = json!(["S256"]);
    }
    serde_json::to_string_pretty(&doc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientAccess, ConfigMapKey, JwksSource, OAuthSpec, SigningAlgorithm};

    fn spec() -> AuthSpec {
        AuthSpec {
            api_keys: vec!["patients-clients".into()],
            oauth: Some(OAuthSpec {
                issuers: vec![IssuerSpec {
                    issuer: "https://idp.example.org".into(),
                    audiences: vec!["https://patients.example.org/fhir".into()],
                    jwks: JwksSource {
                        config_map: Some(ConfigMapKey { name: "idp-jwks".into(), key: "jwks.json".into() }),
                        ..Default::default()
                    },
                    algorithms: vec![SigningAlgorithm::RS256],
                    client_claim: "client_id".into(),
                }],
                smart_configuration: None,
            }),
            clients: vec![ClientAccess { id: "billing-export".into(), scopes: vec!["system/Patient.read".into()] }],
        }
    }

    #[test]
    fn a_valid_spec_checks_and_normalises_scopes() {
        let auth = check(&spec()).unwrap().unwrap();
        assert_eq!(auth.clients.as_ref().unwrap()["billing-export"][0].to_string(), "system/Patient.rs");
        let config = auth_config(&auth, "/fhir", &[], None);
        assert!(config.issuers[0].jwks.keys.is_empty(), "no keys read yet: every token refused");
        assert_eq!(config.clients.unwrap()["billing-export"], vec!["system/Patient.rs".to_owned()]);
        assert_eq!(check(&AuthSpec { api_keys: vec!["k".into()], ..Default::default() }).unwrap(), None);
    }

    #[test]
    fn each_refusal_names_its_field() {
        let field = |edit: &dyn Fn(&mut AuthSpec)| {
            let mut s = spec();
            edit(&mut s);
            check(&s).unwrap_err().field
        };
        assert_eq!(field(&|s| s.clients[0].scopes[0] = "patient/*.rs".into()), "spec.auth.clients[0].scopes[0]");
        assert_eq!(field(&|s| s.clients[0].id = "bad id".into()), "spec.auth.clients[0].id");
        assert_eq!(field(&|s| s.clients.push(s.clients[0].clone())), "spec.auth.clients[1].id");
        let issuer = |s: &mut AuthSpec| s.oauth.as_mut().unwrap().issuers[0].clone();
        assert_eq!(
            field(&|s| s.oauth.as_mut().unwrap().issuers[0].issuer = "http://idp.example.org".into()),
            "spec.auth.oauth.issuers[0].issuer"
        );
        assert_eq!(
            field(&|s| s.oauth.as_mut().unwrap().issuers[0].jwks.uri = Some("https://idp.example.org/jwks".into())),
            "spec.auth.oauth.issuers[0].jwks"
        );
        assert_eq!(
            field(&|s| {
                let i = &mut s.oauth.as_mut().unwrap().issuers[0];
                i.jwks = JwksSource {
                    uri: Some("https://idp.example.org/jwks".into()),
                    refresh_interval: Some("1s".into()),
                    ..Default::default()
                };
            }),
            "spec.auth.oauth.issuers[0].jwks.refreshInterval"
        );
        assert_eq!(
            field(&|s| {
                let copy = issuer(s);
                s.oauth.as_mut().unwrap().issuers.push(copy);
            }),
            "spec.auth.oauth.issuers[1].issuer"
        );
    }

    #[test]
    fn key_sets_hold_only_public_asymmetric_keys_with_ids() {
        let ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"a","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;
        assert_eq!(parse_jwks(ec.as_bytes()).unwrap().1, vec!["a".to_owned()]);
        assert!(parse_jwks(br#"{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}"#).is_err());
        assert!(parse_jwks(ec.replace(r#""kid":"a","#, "").as_bytes()).unwrap_err().contains("no kid"));
        assert!(
            parse_jwks(ec.replace(r#""kid":"a","#, r#""kid":"a","d":"x","#).as_bytes())
                .unwrap_err()
                .contains("private")
        );
        assert!(parse_jwks(br#"{"keys":[]}"#).is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }

    #[test]
    fn the_smart_configuration_names_the_token_endpoint() {
        let mut s = spec();
        assert_eq!(smart_configuration(&s), None);
        s.oauth.as_mut().unwrap().smart_configuration = Some(crate::api::SmartConfigurationSpec {
            token_endpoint: "https://idp.example.org/token".into(),
            authorization_endpoint: None,
            capabilities: vec!["client-confidential-asymmetric".into(), "permission-v2".into()],
        });
        let doc: serde_json::Value = serde_json::from_str(&smart_configuration(&s).unwrap()).unwrap();
        assert_eq!(doc["token_endpoint"], "https://idp.example.org/token");
        assert_eq!(doc["capabilities"][1], "permission-v2");
    }
}
