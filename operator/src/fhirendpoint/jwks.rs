//! The token issuers' public keys, read by the operator (never by the pods,
//! whose egress stays denied): from a ConfigMap at every reconcile, or from
//! a JWKS URL every `refreshInterval`, kept between reconciles. A failed
//! read keeps the keys in force and says why in status; an issuer whose
//! keys were never read gets none, so its tokens are refused.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};

use super::auth::{Auth, KeySource, MAX_JWKS_BYTES, parse_jwks};
use crate::api::TokenIssuerStatus;

/// How soon a ConfigMap source is read again (its changes need no watch),
/// and a failed fetch is tried again.
pub const RECHECK: Duration = Duration::from_secs(60);
/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
struct Fetched {
    set: Option<(JwkSet, Vec<String>)>,
    fetched_at: Option<Timestamp>,
    attempted_at: Timestamp,
    error: String,
}

/// Key sets fetched from URLs, by URL, shared by the reconciles of every
/// endpoint.
pub struct JwksCache {
    client: reqwest::Client,
    fetched: Mutex<HashMap<String, Fetched>>,
}

impl JwksCache {
    /// `ca_file`: extra PEM CA certificates trusted for JWKS URLs (a
    /// private identity provider), besides the system's.
    pub fn new(ca_file: Option<&Path>) -> Result<JwksCache, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("reading --jwks-ca-file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--jwks-ca-file {}: not PEM certificates: {e}", path.display()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| format!("building the JWKS client: {e}"))?;
        Ok(JwksCache { client, fetched: Mutex::new(HashMap::new()) })
    }

    async fn fetch(&self, url: &url::Url) -> Result<(JwkSet, Vec<String>), String> {
        let mut response = self.client.get(url.clone()).send().await.map_err(|e| format!("fetching: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("the server answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| format!("reading: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes"));
            }
        }
        parse_jwks(&body)
    }
}

/// Each issuer's keys, in spec order, the status entries, and when to look
/// again.
pub async fn issuer_keys(
    auth: &Auth,
    client: &Client,
    namespace: &str,
    cache: &JwksCache,
    now: Timestamp,
) -> (Vec<JwkSet>, Vec<TokenIssuerStatus>, Option<Timestamp>) {
    let mut sets = Vec::new();
    let mut statuses = Vec::new();
    let mut recheck: Option<Timestamp> = None;
    let mut soonest = |at: Timestamp| recheck = Some(recheck.map_or(at, |r| r.min(at)));
    for (issuer, source) in &auth.issuers {
        let (set, fetched_at, error) = match source {
            KeySource::ConfigMap { name, key } => {
                soonest(now + RECHECK);
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                let read = match api.get_opt(name).await {
                    Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get(key)) {
                        Some(text) => parse_jwks(text.as_bytes()),
                        None => Err(format!("ConfigMap {name:?} has no key {key:?}")),
                    },
                    Ok(None) => Err(format!("ConfigMap {name:?} does not exist")),
                    Err(e) => Err(format!("reading ConfigMap {name:?}: {e}")),
                };
                match read {
                    Ok(set) => (Some(set), None, String::new()),
                    Err(e) => (None, None, e),
                }
            }
            KeySource::Uri { url, refresh } => {
                let key = url.to_string();
                let previous = cache.fetched.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
                let due = match &previous {
                    None => true,
                    Some(p) if !p.error.is_empty() => p.attempted_at + RECHECK <= now,
                    Some(p) => p.fetched_at.is_none_or(|at| at + *refresh <= now),
                };
                let current = if due {
                    let mut entry = previous.unwrap_or(Fetched {
                        set: None,
                        fetched_at: None,
                        attempted_at: now,
                        error: String::new(),
                    });
                    entry.attempted_at = now;
                    match cache.fetch(url).await {
                        Ok(set) => {
                            entry.set = Some(set);
                            entry.fetched_at = Some(now);
                            entry.error.clear();
                        }
                        Err(e) => entry.error = e,
                    }
                    cache.fetched.lock().unwrap_or_else(|e| e.into_inner()).insert(key, entry.clone());
                    entry
                } else {
                    previous.expect("not due means fetched before")
                };
                let next = match (&current.error.is_empty(), current.fetched_at) {
                    (true, Some(at)) => at + *refresh,
                    _ => current.attempted_at + RECHECK,
                };
                soonest(next);
                (current.set, current.fetched_at, current.error)
            }
        };
        let (set, key_ids) = set.unwrap_or((JwkSet { keys: Vec::new() }, Vec::new()));
        sets.push(set);
        statuses.push(TokenIssuerStatus {
            issuer: issuer.issuer.clone(),
            source: source.describe(),
            key_ids,
            fetched_at: fetched_at.map(|t| t.to_string()),
            error,
        });
    }
    (sets, statuses, recheck)
}
