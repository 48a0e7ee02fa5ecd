//! The token issuers' public keys, read by the operator (never by the pods,
//! whose egress stays denied): from a ConfigMap at every reconcile, or from
//! a JWKS URL every `refreshInterval`, kept between reconciles. A failed
//! read keeps the keys in force and says why in status; an issuer whose
//! keys were never read gets none, so its tokens are refused.
//!
//! A gateway's verifier that meets a token signed with a key it does not
//! know tells the operator ([`JwksCache::hint`]): the issuer's URL is
//! fetched at once (at most once per [`MIN_HINT_INTERVAL`]) and every
//! endpoint using it is reconciled, so a key rotation at the identity
//! provider reaches the gateways before the next scheduled refresh.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client};
use tokio::sync::broadcast;

use super::auth::{Auth, KeySource, MAX_JWKS_BYTES, parse_jwks};
use crate::api::{FhirEndpoint, TokenIssuerStatus};
use crate::gateway_auth::{KeyHint, MAX_HINT_KID};

/// How soon a ConfigMap source is read again (its changes need no watch),
/// and a failed fetch is tried again.
pub const RECHECK: Duration = Duration::from_secs(60);
/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A hint fetches an issuer's keys again at most this often (whatever
/// sends hints: the endpoint is unauthenticated inside the cluster): the
/// interval the verifiers keep between their hints.
pub const MIN_HINT_INTERVAL: Duration = crate::gateway_auth::HINT_INTERVAL;

#[derive(Debug, Clone)]
struct Fetched {
    set: Option<(JwkSet, Vec<String>)>,
    fetched_at: Option<Timestamp>,
    attempted_at: Timestamp,
    error: String,
    /// A hint's fetch waits for [`MIN_HINT_INTERVAL`] to pass.
    deferred: bool,
}

impl Fetched {
    fn new(now: Timestamp) -> Fetched {
        Fetched { set: None, fetched_at: None, attempted_at: now, error: String::new(), deferred: false }
    }
}

/// Key sets fetched from URLs, by URL, shared by the reconciles of every
/// endpoint.
pub struct JwksCache {
    client: reqwest::Client,
    fetched: Mutex<HashMap<String, Fetched>>,
    /// Each endpoint's issuers whose keys come from a URL: issuer → URL.
    users: Mutex<HashMap<(String, String), BTreeMap<String, String>>>,
    /// Endpoints to reconcile after a hint fetched new keys.
    reconcile: broadcast::Sender<ObjectRef<FhirEndpoint>>,
}

/// What became of a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HintOutcome {
    /// No endpoint of that name has that issuer with keys from a URL.
    UnknownIssuer,
    /// The key is among those fetched already (the gateway's copy lags):
    /// the endpoint is reconciled, nothing is fetched.
    AlreadyKnown,
    /// The issuer's keys were fetched less than [`MIN_HINT_INTERVAL`] ago:
    /// they are fetched again once the interval has passed.
    Deferred,
    /// Fetched; whether the key is among them.
    Fetched { known: bool },
    /// The fetch failed; the keys in force stay.
    Failed(String),
    /// No controller runs in this process (a standby replica).
    NotReconciling,
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
        Ok(JwksCache {
            client,
            fetched: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            reconcile: broadcast::channel(1024).0,
        })
    }

    /// Endpoints to reconcile because a hint fetched new keys.
    pub fn subscribe(&self) -> broadcast::Receiver<ObjectRef<FhirEndpoint>> {
        self.reconcile.subscribe()
    }

    /// Remembers which of `endpoint`'s issuers use which URL (for hints).
    fn record(&self, namespace: &str, endpoint: &str, auth: &Auth) {
        let urls: BTreeMap<String, String> = auth
            .issuers
            .iter()
            .filter_map(|(spec, source)| match source {
                KeySource::Uri { url, .. } => Some((spec.issuer.clone(), url.to_string())),
                KeySource::ConfigMap { .. } => None,
            })
            .collect();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let key = (namespace.to_owned(), endpoint.to_owned());
        if urls.is_empty() {
            users.remove(&key);
        } else {
            users.insert(key, urls);
        }
    }

    /// A verifier met a token of `hint.issuer` signed with `hint.kid`, a key
    /// its configuration lacks.
    pub async fn hint(self: &Arc<Self>, hint: &KeyHint, now: Timestamp) -> HintOutcome {
        if self.reconcile.receiver_count() == 0 {
            return HintOutcome::NotReconciling;
        }
        if hint.kid.is_empty() || hint.kid.len() > MAX_HINT_KID {
            return HintOutcome::UnknownIssuer;
        }
        let Some(url) = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(hint.namespace.clone(), hint.endpoint.clone()))
            .and_then(|u| u.get(&hint.issuer))
            .cloned()
        else {
            return HintOutcome::UnknownIssuer;
        };
        {
            let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = fetched.get_mut(&url) {
                if entry.set.as_ref().is_some_and(|(_, ids)| ids.contains(&hint.kid)) {
                    let _ = self.reconcile.send(ObjectRef::new(&hint.endpoint).within(&hint.namespace));
                    return HintOutcome::AlreadyKnown;
                }
                let next = entry.attempted_at + MIN_HINT_INTERVAL;
                if next > now {
                    if !entry.deferred {
                        entry.deferred = true;
                        let wait = Duration::try_from(next.duration_since(now)).unwrap_or(MIN_HINT_INTERVAL);
                        let (this, url) = (self.clone(), url.clone());
                        tokio::spawn(async move {
                            tokio::time::sleep(wait).await;
                            this.fetch_and_reconcile(&url, "", Timestamp::now()).await;
                        });
                    }
                    return HintOutcome::Deferred;
                }
                // Taken: a concurrent hint is deferred, not fetched twice.
                entry.attempted_at = now;
            }
        }
        self.fetch_and_reconcile(&url, &hint.kid, now).await
    }

    /// Fetches `url` now, keeps what it got, and reconciles every endpoint
    /// using it; says whether `kid` is among the keys.
    async fn fetch_and_reconcile(&self, url: &str, kid: &str, now: Timestamp) -> HintOutcome {
        let result = match url::Url::parse(url) {
            Ok(parsed) => self.fetch(&parsed).await,
            Err(e) => Err(e.to_string()),
        };
        let outcome = {
            let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            let entry = fetched.entry(url.to_owned()).or_insert_with(|| Fetched::new(now));
            entry.attempted_at = now;
            entry.deferred = false;
            match result {
                Ok(set) => {
                    let known = set.1.iter().any(|id| id == kid);
                    tracing::info!(%url, key_ids = %set.1.join(","), "fetched a token issuer's keys on a hint");
                    entry.set = Some(set);
                    entry.fetched_at = Some(now);
                    entry.error.clear();
                    HintOutcome::Fetched { known }
                }
                Err(e) => {
                    entry.error = e.clone();
                    HintOutcome::Failed(e)
                }
            }
        };
        let endpoints: Vec<ObjectRef<FhirEndpoint>> = self
            .users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, urls)| urls.values().any(|u| u == url))
            .map(|((ns, name), _)| ObjectRef::new(name).within(ns))
            .collect();
        for endpoint in endpoints {
            let _ = self.reconcile.send(endpoint);
        }
        if let HintOutcome::Failed(error) = &outcome {
            tracing::warn!(%url, %error, "fetching a token issuer's keys on a hint failed; the keys in force stay");
        }
        outcome
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
    endpoint: &str,
    cache: &JwksCache,
    now: Timestamp,
) -> (Vec<JwkSet>, Vec<TokenIssuerStatus>, Option<Timestamp>) {
    cache.record(namespace, endpoint, auth);
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
                    let mut entry = previous.unwrap_or(Fetched::new(now));
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

/// Largest hint body accepted.
const MAX_HINT_BYTES: usize = 4096;

fn dns_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Serves `POST /v1/key-hints` (a [`KeyHint`] as JSON) until `shutdown`.
/// Answers 200 (fetched, or already known), 404 (no such issuer with keys
/// from a URL for that endpoint), 202 (fetched lately: fetched again
/// once [`MIN_HINT_INTERVAL`] has passed), 502 (the fetch
/// failed), 503 (a standby replica: no controller runs here), 400 (not a
/// hint).
pub async fn serve_hints(
    listener: tokio::net::TcpListener,
    cache: Arc<JwksCache>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::extract::{DefaultBodyLimit, State};
    use axum::http::StatusCode;

    async fn receive(State(cache): State<Arc<JwksCache>>, body: axum::body::Bytes) -> (StatusCode, String) {
        let hint: KeyHint = match serde_json::from_slice(&body) {
            Ok(hint) => hint,
            Err(_) => return (StatusCode::BAD_REQUEST, "not a key hint\n".into()),
        };
        if !dns_name(&hint.namespace) || !dns_name(&hint.endpoint) || hint.issuer.len() > 2048 {
            return (StatusCode::BAD_REQUEST, "not a key hint\n".into());
        }
        let outcome = cache.hint(&hint, Timestamp::now()).await;
        let (status, name) = match &outcome {
            HintOutcome::UnknownIssuer => (StatusCode::NOT_FOUND, "unknown-issuer"),
            HintOutcome::AlreadyKnown => (StatusCode::OK, "already-known"),
            HintOutcome::Deferred => (StatusCode::ACCEPTED, "deferred"),
            HintOutcome::Fetched { known: true } => (StatusCode::OK, "fetched"),
            HintOutcome::Fetched { known: false } => (StatusCode::OK, "fetched-key-absent"),
            HintOutcome::Failed(_) => (StatusCode::BAD_GATEWAY, "fetch-failed"),
            HintOutcome::NotReconciling => (StatusCode::SERVICE_UNAVAILABLE, "not-reconciling"),
        };
        let error = match &outcome {
            HintOutcome::Failed(e) => e.as_str(),
            _ => "",
        };
        tracing::info!(namespace = %hint.namespace, endpoint = %hint.endpoint, issuer = %hint.issuer,
            kid = %hint.kid, outcome = name, error, "key hint");
        (status, format!("{name}\n"))
    }

    let app = axum::Router::new()
        .route("/v1/key-hints", axum::routing::post(receive))
        .layer(DefaultBodyLimit::max(MAX_HINT_BYTES))
        .with_state(cache);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IssuerSpec;

    const ISSUER: &str = "https://idp.example.org";
    const URL: &str = "https://idp.example.org/jwks";

    fn auth() -> Auth {
        let spec = IssuerSpec { issuer: ISSUER.into(), ..Default::default() };
        let source = KeySource::Uri { url: url::Url::parse(URL).unwrap(), refresh: Duration::from_secs(300) };
        Auth { issuers: vec![(spec, source)], clients: None }
    }

    fn hint(endpoint: &str, kid: &str) -> KeyHint {
        KeyHint { namespace: "ns".into(), endpoint: endpoint.into(), issuer: ISSUER.into(), kid: kid.into() }
    }

    #[tokio::test]
    async fn a_hint_is_answered_without_fetching_when_it_cannot_help() {
        let cache = Arc::new(JwksCache::new(None).expect("cache"));
        let now = Timestamp::now();
        assert_eq!(cache.hint(&hint("patients", "k2"), now).await, HintOutcome::NotReconciling);
        let mut reconciles = cache.subscribe();
        assert_eq!(cache.hint(&hint("patients", "k2"), now).await, HintOutcome::UnknownIssuer);
        cache.record("ns", "patients", &auth());
        cache.record("ns", "claims", &auth());
        assert_eq!(cache.hint(&hint("other", "k2"), now).await, HintOutcome::UnknownIssuer);
        let set: JwkSet = serde_json::from_value(serde_json::json!({"keys": []})).unwrap();
        cache.fetched.lock().unwrap().insert(
            URL.into(),
            Fetched {
                set: Some((set, vec!["k1".into()])),
                fetched_at: Some(now),
                attempted_at: now,
                error: String::new(),
                deferred: true,
            },
        );
        // Known already: only the endpoint that asked is reconciled.
        assert_eq!(cache.hint(&hint("claims", "k1"), now).await, HintOutcome::AlreadyKnown);
        assert_eq!(reconciles.try_recv().expect("a reconcile").name, "claims");
        assert!(reconciles.try_recv().is_err());
        // Fetched a moment ago: later (already planned here, so no fetch).
        let soon = now + Duration::from_secs(5);
        assert_eq!(cache.hint(&hint("patients", "k2"), soon).await, HintOutcome::Deferred);
        // An endpoint that no longer uses a URL is forgotten.
        cache.record("ns", "patients", &Auth { issuers: Vec::new(), clients: None });
        assert_eq!(cache.hint(&hint("patients", "k2"), soon).await, HintOutcome::UnknownIssuer);
    }
}
