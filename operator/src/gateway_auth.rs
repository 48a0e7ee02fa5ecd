//! `fhir-operator gateway-auth`: the token verifier beside nginx. nginx asks
//! it about every request (`auth_request`), passing the method, the raw
//! request URI, the client its API-key map found and the `Authorization`
//! header; it answers 200 with the authenticated client, subject, token id
//! and granted scopes in headers nginx forwards to the FHIR server, or 401
//! (`invalid_token`) / 403 (`insufficient_scope`) with the reason nginx puts
//! in the OperationOutcome.
//!
//! Its whole configuration, the issuers' public keys included, is one JSON
//! file ([`AuthConfig`]) the operator renders into the gateway's ConfigMap;
//! the verifier reads it again whenever it changes, so new keys and scopes
//! apply without a restart. Verified tokens are cached by the SHA-256 of
//! the token until their `exp`; the token itself is never kept, logged or
//! counted (the log names the client and the `jti`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::SigningAlgorithm;
use crate::smart::{Classified, Grants, Scope, classify};

/// Loopback port the verifier listens on; only nginx talks to it.
pub const PORT: u16 = 9114;
/// Request headers nginx sends with each check.
pub const ORIGINAL_METHOD: &str = "x-original-method";
pub const ORIGINAL_URI: &str = "x-original-uri";
/// The client id nginx's API-key map found (empty: no valid key).
pub const API_CLIENT: &str = "x-api-client";
/// Answer headers nginx reads with `auth_request_set`.
pub const AUTH_CLIENT: &str = "x-auth-client";
pub const AUTH_SUBJECT: &str = "x-auth-subject";
pub const AUTH_SCOPES: &str = "x-auth-scopes";
pub const AUTH_JTI: &str = "x-auth-jti";
/// `WWW-Authenticate` value for a 401 or 403.
pub const AUTH_CHALLENGE: &str = "x-auth-challenge";
/// Why a request was refused: one of the fixed texts of [`Denial`], safe
/// to put in a JSON string as is.
pub const AUTH_REASON: &str = "x-auth-reason";

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_SECONDS: u64 = 5;
/// Verified tokens kept at most; beyond, expired ones are dropped, then all.
const CACHE_CAPACITY: usize = 10_000;

/// The verifier's configuration file (`auth.json` in the gateway's
/// ConfigMap).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    /// The FHIR base path, `/` or e.g. `/fhir`.
    pub base_path: String,
    /// Scopes per client id; `None`: every authenticated client may do
    /// everything (no `spec.auth.clients`).
    pub clients: Option<BTreeMap<String, Vec<String>>>,
    pub issuers: Vec<IssuerConfig>,
    /// Where to report a token signed with a key no issuer publishes (yet),
    /// so that the operator fetches the issuer's keys at once instead of at
    /// its next scheduled refresh. `None`: scheduled refreshes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hints: Option<KeyHintsConfig>,
}

/// The operator's hint receiver, and which endpoint this verifier serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyHintsConfig {
    pub url: String,
    pub namespace: String,
    pub endpoint: String,
}

/// What the verifier tells the operator: a token of `issuer` named a key
/// id it does not know. No token, claim or signature goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyHint {
    pub namespace: String,
    pub endpoint: String,
    pub issuer: String,
    pub kid: String,
}

/// Longest key id a hint carries (a longer one is not reported).
pub const MAX_HINT_KID: usize = 128;

/// One token issuer, with its public keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<SigningAlgorithm>,
    pub client_claim: String,
    pub jwks: JwkSet,
    /// The keys come from a URL the operator can fetch again on a hint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refreshable: bool,
}

pub fn algorithm(alg: SigningAlgorithm) -> Algorithm {
    match alg {
        SigningAlgorithm::RS256 => Algorithm::RS256,
        SigningAlgorithm::RS384 => Algorithm::RS384,
        SigningAlgorithm::RS512 => Algorithm::RS512,
        SigningAlgorithm::PS256 => Algorithm::PS256,
        SigningAlgorithm::PS384 => Algorithm::PS384,
        SigningAlgorithm::PS512 => Algorithm::PS512,
        SigningAlgorithm::ES256 => Algorithm::ES256,
        SigningAlgorithm::ES384 => Algorithm::ES384,
        SigningAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// One check, as nginx sends it.
#[derive(Debug, Clone, Copy)]
pub struct Check<'a> {
    pub method: &'a str,
    /// `$request_uri`: raw path and query.
    pub uri: &'a str,
    /// The client of a valid API key, or empty.
    pub api_client: &'a str,
    pub authorization: Option<&'a str>,
}

/// A request allowed, and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub client: String,
    pub subject: String,
    pub jti: String,
    /// The scopes in force for the request (space-separated).
    pub scopes: String,
}

/// Why a request is refused. The texts are fixed: no token, key or
/// request content ever goes into them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    NoCredentials,
    MalformedToken,
    UnknownIssuer,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    NoClient,
    ClientMismatch,
    ClientNotListed,
    InsufficientScope,
    UnreadableRequest,
}

impl Denial {
    pub fn status(self) -> StatusCode {
        match self {
            Denial::ClientNotListed | Denial::InsufficientScope | Denial::UnreadableRequest => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The RFC 6750 error code (none when no credentials were sent).
    pub fn error(self) -> Option<&'static str> {
        match self {
            Denial::NoCredentials => None,
            Denial::ClientNotListed | Denial::InsufficientScope | Denial::UnreadableRequest => {
                Some("insufficient_scope")
            }
            _ => Some("invalid_token"),
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Denial::NoCredentials => "An X-API-Key header or a Bearer token is required.",
            Denial::MalformedToken => "The bearer token is not a signed JWT the gateway accepts.",
            Denial::UnknownIssuer => "The token's issuer is not trusted by this endpoint.",
            Denial::UnknownKey => "The token is signed with a key the issuer has not published.",
            Denial::BadSignature => "The token's signature or algorithm is not valid.",
            Denial::Expired => "The token has expired.",
            Denial::NotYetValid => "The token is not valid yet.",
            Denial::WrongAudience => "The token is not meant for this endpoint (aud).",
            Denial::NoClient => "The token names no client.",
            Denial::ClientMismatch => "The API key and the token belong to different clients.",
            Denial::ClientNotListed => "The client has no access to this endpoint.",
            Denial::InsufficientScope => "The client's scopes do not allow this interaction on this resource type.",
            Denial::UnreadableRequest => "The gateway cannot tell which FHIR interaction this request is.",
        }
    }

    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Denial::NoCredentials => "no_credentials",
            Denial::MalformedToken => "malformed_token",
            Denial::UnknownIssuer => "unknown_issuer",
            Denial::UnknownKey => "unknown_key",
            Denial::BadSignature => "bad_signature",
            Denial::Expired => "expired",
            Denial::NotYetValid => "not_yet_valid",
            Denial::WrongAudience => "wrong_audience",
            Denial::NoClient => "no_client",
            Denial::ClientMismatch => "client_mismatch",
            Denial::ClientNotListed => "client_not_listed",
            Denial::InsufficientScope => "insufficient_scope",
            Denial::UnreadableRequest => "unreadable_request",
        }
    }

    /// The `WWW-Authenticate` challenge.
    pub fn challenge(self) -> String {
        match self.error() {
            None => "Bearer realm=\"fhir\", ApiKey header=\"X-API-Key\"".to_owned(),
            Some(error) => format!("Bearer realm=\"fhir\", error=\"{error}\""),
        }
    }
}

/// What a token says, once verified.
#[derive(Debug, Clone)]
struct Verified {
    client: String,
    subject: String,
    jti: String,
    scope: String,
    exp: u64,
}

/// The token of an `Authorization: Bearer` header; `None` without one.
fn bearer(authorization: Option<&str>) -> Result<Option<&str>, Denial> {
    match authorization {
        Some(value) => match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Ok(Some(token.trim()))
            }
            _ => Err(Denial::MalformedToken),
        },
        None => Ok(None),
    }
}

#[derive(Debug, Deserialize)]
struct UnverifiedClaims {
    iss: Option<String>,
}

/// The checks, from one configuration.
pub struct Verifier {
    base_path: String,
    clients: Option<HashMap<String, Grants>>,
    issuers: Vec<IssuerConfig>,
    key_hints: Option<KeyHintsConfig>,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

impl Verifier {
    /// Fails on scopes that do not parse (the operator validated them).
    pub fn new(config: AuthConfig) -> Result<Verifier, String> {
        let clients = match config.clients {
            None => None,
            Some(clients) => {
                let mut parsed = HashMap::new();
                for (client, scopes) in clients {
                    let scopes = scopes
                        .iter()
                        .map(|s| Scope::parse(s))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())?;
                    parsed.insert(client, Grants { scopes });
                }
                Some(parsed)
            }
        };
        Ok(Verifier {
            base_path: config.base_path,
            clients,
            issuers: config.issuers,
            key_hints: config.key_hints,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// For a token refused for [`Denial::UnknownKey`]: where to tell the
    /// operator, and what (an issuer whose keys come from a URL, and a
    /// short printable key id it does not publish here), else `None`.
    pub fn key_hint(&self, authorization: Option<&str>) -> Option<(String, KeyHint)> {
        let target = self.key_hints.as_ref()?;
        let token = bearer(authorization).ok()??;
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        if kid.is_empty() || kid.len() > MAX_HINT_KID || !kid.bytes().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        let claims: UnverifiedClaims = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
        let iss = claims.iss?;
        let issuer = self.issuers.iter().find(|i| i.issuer == iss && i.refreshable)?;
        if issuer.jwks.find(&kid).is_some() {
            return None;
        }
        let hint = KeyHint {
            namespace: target.namespace.clone(),
            endpoint: target.endpoint.clone(),
            issuer: issuer.issuer.clone(),
            kid,
        };
        Some((target.url.clone(), hint))
    }

    /// Decides one request at `now` (Unix seconds).
    pub fn check(&self, check: &Check<'_>, now: u64) -> Result<Allowed, Denial> {
        let (client, token) = match bearer(check.authorization)? {
            Some(token) => {
                let verified = self.verify_token(token, now)?;
                if !check.api_client.is_empty() && check.api_client != verified.client {
                    return Err(Denial::ClientMismatch);
                }
                (verified.client.clone(), Some(verified))
            }
            None if !check.api_client.is_empty() => (check.api_client.to_owned(), None),
            None => return Err(Denial::NoCredentials),
        };
        let (path, query) = check.uri.split_once('?').unwrap_or((check.uri, ""));
        let Classified { needs, .. } =
            classify(check.method, path, query, &self.base_path).map_err(|_| Denial::UnreadableRequest)?;
        let listed = match &self.clients {
            None => None,
            Some(clients) => Some(clients.get(&client).ok_or(Denial::ClientNotListed)?),
        };
        let from_token = token.as_ref().map(|t| Grants::from_claim(&t.scope));
        for grants in [listed, from_token.as_ref()].into_iter().flatten() {
            if !grants.allow(&needs) {
                return Err(Denial::InsufficientScope);
            }
        }
        // The scopes in force: the token's where there is one (already
        // checked against the client's list), else the client's list.
        let scopes = match (&from_token, listed) {
            (Some(t), _) => t.to_claim(),
            (None, Some(l)) => l.to_claim(),
            (None, None) => Grants::all().to_claim(),
        };
        let (subject, jti) = token.map(|t| (t.subject, t.jti)).unwrap_or_default();
        Ok(Allowed { client, subject, jti, scopes })
    }

    fn verify_token(&self, token: &str, now: u64) -> Result<Verified, Denial> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&hash)
            && hit.exp + LEEWAY_SECONDS > now
        {
            return Ok(hit.clone());
        }
        let verified = self.verify_uncached(token, now)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, v| v.exp + LEEWAY_SECONDS > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(hash, verified.clone());
        Ok(verified)
    }

    fn verify_uncached(&self, token: &str, now: u64) -> Result<Verified, Denial> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denial::MalformedToken)?;
        let unverified: UnverifiedClaims =
            jsonwebtoken::dangerous::insecure_decode_claims(token).map_err(|_| Denial::MalformedToken)?;
        let issuer = unverified
            .iss
            .and_then(|iss| self.issuers.iter().find(|i| i.issuer == iss))
            .ok_or(Denial::UnknownIssuer)?;
        let algorithms: Vec<Algorithm> = issuer.algorithms.iter().copied().map(algorithm).collect();
        if !algorithms.contains(&header.alg) {
            return Err(Denial::BadSignature);
        }
        let jwk = match &header.kid {
            Some(kid) => issuer.jwks.find(kid),
            None if issuer.jwks.keys.len() == 1 => issuer.jwks.keys.first(),
            None => None,
        }
        .ok_or(Denial::UnknownKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| Denial::BadSignature)?;
        let mut validation = Validation::new(header.alg);
        // Times are checked below against `now`, the same clock the cache uses.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_audience(&issuer.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => Denial::Expired,
                ErrorKind::ImmatureSignature => Denial::NotYetValid,
                ErrorKind::InvalidAudience => Denial::WrongAudience,
                ErrorKind::InvalidIssuer => Denial::UnknownIssuer,
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Denial::WrongAudience,
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    Denial::MalformedToken
                }
                _ => Denial::BadSignature,
            })?;
        let claims = data.claims;
        let time = |name: &str| claims.get(name).map(|v| v.as_u64().ok_or(Denial::MalformedToken)).transpose();
        let exp = time("exp")?.ok_or(Denial::MalformedToken)?;
        if exp + LEEWAY_SECONDS <= now {
            return Err(Denial::Expired);
        }
        if time("nbf")?.is_some_and(|nbf| nbf > now + LEEWAY_SECONDS) {
            return Err(Denial::NotYetValid);
        }
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let client = Some(text(&issuer.client_claim)).filter(|c| !c.is_empty()).unwrap_or_else(|| text("azp"));
        if client.is_empty() || !client.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(Denial::NoClient);
        }
        let safe = |value: String| {
            if value.len() <= 256 && value.bytes().all(|b| b.is_ascii_graphic()) { value } else { String::new() }
        };
        Ok(Verified { client, subject: safe(text("sub")), jti: safe(text("jti")), scope: text("scope"), exp })
    }
}

/// Command-line arguments of `fhir-operator gateway-auth`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The configuration file ([`AuthConfig`] as JSON), read again when it changes.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Address nginx's `auth_request` calls.
    #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([127, 0, 0, 1], PORT)))]
    pub listen: SocketAddr,
    /// How often the configuration file is looked at.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub reload_interval: Duration,
}

struct Shared {
    verifier: RwLock<Arc<Verifier>>,
    hinter: Arc<Hinter>,
}

/// Once the operator took a hint for an issuer (or said it fetched its keys
/// a moment ago), the next one waits this long: tokens with made-up key
/// ids cost the operator at most one fetch per interval.
pub const HINT_INTERVAL: Duration = Duration::from_secs(10);
/// A hint that did not reach the operator (a restart, a standby replica
/// behind the Service) may be sent again this soon.
pub const HINT_RETRY: Duration = Duration::from_secs(1);
const HINT_TIMEOUT: Duration = Duration::from_secs(15);

/// Tells the operator of unknown signing keys, in the background: the
/// refused request is not held up, and the next token with the same key
/// is accepted once the kubelet has updated the configuration file.
pub struct Hinter {
    client: reqwest::Client,
    next: Mutex<HashMap<String, std::time::Instant>>,
}

impl Default for Hinter {
    fn default() -> Self {
        let client = reqwest::Client::builder()
            .timeout(HINT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Hinter { client, next: Mutex::new(HashMap::new()) }
    }
}

impl Hinter {
    /// Whether a hint for `issuer` may go now; if so, holds back the next.
    fn reserve(&self, issuer: &str, now: std::time::Instant) -> bool {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.get(issuer).is_some_and(|at| *at > now) {
            return false;
        }
        next.insert(issuer.to_owned(), now + HINT_INTERVAL);
        true
    }

    fn retry_soon(&self, issuer: &str) {
        let at = std::time::Instant::now() + HINT_RETRY;
        self.next.lock().unwrap_or_else(|e| e.into_inner()).insert(issuer.to_owned(), at);
    }

    /// Sends `hint` to `url` unless one for its issuer went out lately.
    pub fn send(self: &Arc<Self>, url: String, hint: KeyHint) {
        if !self.reserve(&hint.issuer, std::time::Instant::now()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let body = serde_json::to_vec(&hint).unwrap_or_default();
            let answer = this
                .client
                .post(&url)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(issuer = %hint.issuer, kid = %hint.kid, status = r.status().as_u16(),
                        "told the operator of a signing key not published here");
                }
                Ok(r) => {
                    this.retry_soon(&hint.issuer);
                    tracing::warn!(issuer = %hint.issuer, status = r.status().as_u16(), "the operator did not take the key hint");
                }
                Err(error) => {
                    this.retry_soon(&hint.issuer);
                    tracing::warn!(issuer = %hint.issuer, error = %error.without_url(), "cannot reach the operator with a key hint");
                }
            }
        });
    }
}

fn load(path: &Path) -> Result<(Vec<u8>, Verifier), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let config: AuthConfig = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a gateway-auth configuration: {e}", path.display()))?;
    Ok((bytes, Verifier::new(config)?))
}

/// Serves checks until the process is stopped. Fails at once when the
/// configuration cannot be read: nginx then answers 500, never lets a
/// request through unchecked.
pub async fn run(args: Args) -> Result<(), String> {
    jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default().ok();
    let (mut current, verifier) = load(&args.config)?;
    let shared = Arc::new(Shared { verifier: RwLock::new(Arc::new(verifier)), hinter: Arc::default() });
    let reload = shared.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(args.reload_interval);
        loop {
            tick.tick().await;
            match std::fs::read(&args.config) {
                Ok(bytes) if bytes == current => {}
                Ok(_) => match load(&args.config) {
                    Ok((bytes, verifier)) => {
                        *reload.verifier.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(verifier);
                        current = bytes;
                        tracing::info!("gateway-auth configuration reloaded");
                    }
                    Err(error) => tracing::error!(%error, "keeping the previous gateway-auth configuration"),
                },
                Err(error) => tracing::error!(%error, "keeping the previous gateway-auth configuration"),
            }
        }
    });
    let app =
        axum::Router::new().route("/check", get(check)).route("/healthz", get(|| async { "ok" })).with_state(shared);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, "gateway-auth serving");
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}

async fn check(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let request = Check {
        method: header(ORIGINAL_METHOD).unwrap_or_default(),
        uri: header(ORIGINAL_URI).unwrap_or_default(),
        api_client: header(API_CLIENT).unwrap_or_default(),
        authorization: header("authorization").filter(|v| !v.is_empty()),
    };
    let verifier = shared.verifier.read().unwrap_or_else(|e| e.into_inner()).clone();
    let now = jsonwebtoken::get_current_timestamp();
    let mut out = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            out.insert(HeaderName::from_static(name), value);
        }
    };
    match verifier.check(&request, now) {
        Ok(allowed) => {
            set(AUTH_CLIENT, &allowed.client);
            set(AUTH_SUBJECT, &allowed.subject);
            set(AUTH_SCOPES, &allowed.scopes);
            set(AUTH_JTI, &allowed.jti);
            (StatusCode::OK, out).into_response()
        }
        Err(denial) => {
            tracing::info!(client = request.api_client, denial = denial.name(), "request refused");
            if denial == Denial::UnknownKey
                && let Some((url, hint)) = verifier.key_hint(request.authorization)
            {
                shared.hinter.send(url, hint);
            }
            set(AUTH_CHALLENGE, &denial.challenge());
            set(AUTH_REASON, denial.reason());
            (denial.status(), out).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const ISS: &str = "https://idp.example.org";
    const AUD: &str = "https://patients.example.org/fhir";

    struct Key {
        encoding: EncodingKey,
        kid: String,
        jwk: jsonwebtoken::jwk::Jwk,
    }

    fn key(kid: &str) -> Key {
        jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default().ok();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let encoding = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some(kid.to_owned());
        Key { encoding, kid: kid.to_owned(), jwk }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(key: &Key, claims: serde_json::Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        encode(&header, &claims, &key.encoding).expect("sign")
    }

    fn claims(client: &str, scope: &str) -> serde_json::Value {
        json!({"iss": ISS, "aud": AUD, "exp": now() + 300, "iat": now(), "jti": "jti-1",
               "client_id": client, "sub": client, "scope": scope})
    }

    fn verifier(keys: &[&Key], clients: Option<&[(&str, &[&str])]>) -> Verifier {
        let clients = clients.map(|list| {
            list.iter().map(|(id, scopes)| (id.to_string(), scopes.iter().map(|s| s.to_string()).collect())).collect()
        });
        Verifier::new(AuthConfig {
            base_path: "/fhir".into(),
            clients,
            issuers: vec![IssuerConfig {
                issuer: ISS.into(),
                audiences: vec![AUD.into()],
                algorithms: vec![SigningAlgorithm::ES256, SigningAlgorithm::RS256],
                client_claim: "client_id".into(),
                jwks: JwkSet { keys: keys.iter().map(|k| k.jwk.clone()).collect() },
                refreshable: true,
            }],
            key_hints: Some(KeyHintsConfig {
                url: "http://operator.test:8081/v1/key-hints".into(),
                namespace: "ns".into(),
                endpoint: "patients".into(),
            }),
        })
        .expect("verifier")
    }

    #[test]
    fn an_unknown_key_id_yields_a_hint_naming_issuer_and_kid_and_nothing_else() {
        let (k1, k2) = (key("k1"), key("k2"));
        let v = verifier(&[&k1], None);
        let token = sign(&k2, claims("c", "system/*.rs"));
        assert_eq!(bearer(&v, &token, "GET", "/fhir/Patient/1"), Err(Denial::UnknownKey));
        let (url, hint) = v.key_hint(Some(&format!("Bearer {token}"))).expect("a hint");
        assert_eq!(url, "http://operator.test:8081/v1/key-hints");
        assert_eq!(
            hint,
            KeyHint { namespace: "ns".into(), endpoint: "patients".into(), issuer: ISS.into(), kid: "k2".into() }
        );
        let sent = serde_json::to_string(&hint).expect("json");
        assert!(!sent.contains(token.rsplit('.').next().unwrap()), "no signature in a hint");
        // A key it knows, a kid too long or unprintable, an issuer whose
        // keys come from a ConfigMap, no hint target: no hint.
        assert!(v.key_hint(Some(&format!("Bearer {}", sign(&k1, claims("c", ""))))).is_none());
        for kid in ["x".repeat(MAX_HINT_KID + 1), "a b".into(), "a\nb".into()] {
            let odd = Key { kid: kid.clone(), ..key("k3") };
            assert!(v.key_hint(Some(&format!("Bearer {}", sign(&odd, claims("c", ""))))).is_none(), "{kid:?}");
        }
        let mut config_map_issuer = verifier(&[&k1], None);
        config_map_issuer.issuers[0].refreshable = false;
        assert!(config_map_issuer.key_hint(Some(&format!("Bearer {token}"))).is_none());
        let mut no_target = verifier(&[&k1], None);
        no_target.key_hints = None;
        assert!(no_target.key_hint(Some(&format!("Bearer {token}"))).is_none());
        assert!(v.key_hint(Some("Basic abc")).is_none());
    }

    #[test]
    fn hints_for_one_issuer_go_at_most_once_per_interval() {
        let hinter = Hinter::default();
        let t0 = std::time::Instant::now();
        assert!(hinter.reserve("https://a", t0));
        assert!(!hinter.reserve("https://a", t0 + Duration::from_secs(1)));
        assert!(hinter.reserve("https://b", t0), "each issuer has its own interval");
        assert!(hinter.reserve("https://a", t0 + HINT_INTERVAL));
    }

    fn bearer(v: &Verifier, token: &str, method: &str, uri: &str) -> Result<Allowed, Denial> {
        let authorization = format!("Bearer {token}");
        v.check(&Check { method, uri, api_client: "", authorization: Some(&authorization) }, now())
    }

    const BILLING: &[&str] = &["system/Patient.rs", "system/Coverage.rs"];
    const PORTAL: &[&str] = &["system/*.cruds"];

    #[test]
    fn a_valid_token_is_allowed_within_the_scopes_of_token_and_client_list() {
        let k = key("k1");
        let v = verifier(&[&k], Some(&[("billing-export", BILLING), ("clinical-portal", PORTAL)]));
        let token = sign(&k, claims("billing-export", "system/Patient.rs system/Patient.c"));
        let allowed = bearer(&v, &token, "GET", "/fhir/Patient/1").expect("allowed");
        assert_eq!(allowed.client, "billing-export");
        assert_eq!(allowed.jti, "jti-1");
        // The token grants create, the client's list does not.
        assert_eq!(bearer(&v, &token, "POST", "/fhir/Patient"), Err(Denial::InsufficientScope));
        // The list grants Coverage, the token does not.
        assert_eq!(bearer(&v, &token, "GET", "/fhir/Coverage/1"), Err(Denial::InsufficientScope));
        let stranger = sign(&k, claims("stranger", "system/*.cruds"));
        assert_eq!(bearer(&v, &stranger, "GET", "/fhir/Patient/1"), Err(Denial::ClientNotListed));
        // Without a client list, the token's scopes alone decide.
        let open = verifier(&[&k], None);
        assert!(bearer(&open, &stranger, "DELETE", "/fhir/Patient/1").is_ok());
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let k = key("k1");
        let other = key("k1");
        let v = verifier(&[&k], None);
        let mut c = claims("c", "system/*.cruds");
        c["exp"] = json!(now() - 60);
        assert_eq!(bearer(&v, &sign(&k, c), "GET", "/fhir/Patient/1"), Err(Denial::Expired));
        let mut c = claims("c", "system/*.cruds");
        c["nbf"] = json!(now() + 120);
        assert_eq!(bearer(&v, &sign(&k, c), "GET", "/fhir/Patient/1"), Err(Denial::NotYetValid));
        let mut c = claims("c", "system/*.cruds");
        c["iss"] = json!("https://evil.example.org");
        assert_eq!(bearer(&v, &sign(&k, c), "GET", "/fhir/Patient/1"), Err(Denial::UnknownIssuer));
        let mut c = claims("c", "system/*.cruds");
        c["aud"] = json!("https://other.example.org/fhir");
        assert_eq!(bearer(&v, &sign(&k, c), "GET", "/fhir/Patient/1"), Err(Denial::WrongAudience));
        let mut c = claims("c", "system/*.cruds");
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(bearer(&v, &sign(&k, c), "GET", "/fhir/Patient/1"), Err(Denial::WrongAudience));
        // Same kid, another key: the signature does not verify.
        let forged = sign(&other, claims("c", "system/*.cruds"));
        assert_eq!(bearer(&v, &forged, "GET", "/fhir/Patient/1"), Err(Denial::BadSignature));
        // One character of the payload changed.
        let good = sign(&k, claims("c", "system/*.cruds"));
        let parts: Vec<&str> = good.split('.').collect();
        let mut payload = parts[1].to_owned();
        let last = payload.pop().unwrap();
        payload.push(if last == 'A' { 'B' } else { 'A' });
        let tampered = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert!(bearer(&v, &tampered, "GET", "/fhir/Patient/1").is_err());
        // alg none: no signature at all.
        let b64 = |v: serde_json::Value| base64ct::Base64UrlUnpadded::encode_string(v.to_string().as_bytes());
        use base64ct::Encoding;
        let none = format!("{}.{}.", b64(json!({"alg": "none", "kid": "k1"})), b64(claims("c", "system/*.cruds")));
        assert_eq!(bearer(&v, &none, "GET", "/fhir/Patient/1"), Err(Denial::MalformedToken));
        // HS256 keyed with the public key's bytes.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let public = serde_json::to_vec(&k.jwk).unwrap();
        let hs = encode(&header, &claims("c", "system/*.cruds"), &EncodingKey::from_secret(&public).unwrap()).unwrap();
        assert_eq!(bearer(&v, &hs, "GET", "/fhir/Patient/1"), Err(Denial::BadSignature));
        // A kid the issuer has not published.
        let rotated = key("k2");
        assert_eq!(
            bearer(&v, &sign(&rotated, claims("c", "system/*.cruds")), "GET", "/fhir/Patient/1"),
            Err(Denial::UnknownKey)
        );
        let refreshed = verifier(&[&k, &rotated], None);
        assert!(bearer(&refreshed, &sign(&rotated, claims("c", "system/*.cruds")), "GET", "/fhir/Patient/1").is_ok());
        assert_eq!(bearer(&v, "not-a-jwt", "GET", "/fhir/Patient/1"), Err(Denial::MalformedToken));
    }

    #[test]
    fn api_keys_and_tokens_must_name_the_same_client() {
        let k = key("k1");
        let v = verifier(&[&k], Some(&[("billing-export", BILLING), ("clinical-portal", PORTAL)]));
        let token = sign(&k, claims("clinical-portal", "system/*.cruds"));
        let authorization = format!("Bearer {token}");
        let check = Check {
            method: "GET",
            uri: "/fhir/Patient/1",
            api_client: "billing-export",
            authorization: Some(&authorization),
        };
        assert_eq!(v.check(&check, now()), Err(Denial::ClientMismatch));
        let by_key = Check { authorization: None, ..check };
        assert!(v.check(&by_key, now()).is_ok());
        assert_eq!(v.check(&Check { method: "DELETE", ..by_key }, now()), Err(Denial::InsufficientScope));
        assert_eq!(v.check(&Check { api_client: "", ..by_key }, now()), Err(Denial::NoCredentials));
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires() {
        let k = key("k1");
        let v = verifier(&[&k], None);
        let mut c = claims("c", "system/*.cruds");
        c["exp"] = json!(now() + 2);
        let token = sign(&k, c);
        let authorization = format!("Bearer {token}");
        let check =
            Check { method: "GET", uri: "/fhir/Patient/1", api_client: "", authorization: Some(&authorization) };
        assert!(v.check(&check, now()).is_ok());
        assert!(v.check(&check, now()).is_ok(), "from the cache");
        assert_eq!(v.check(&check, now() + 2 + LEEWAY_SECONDS), Err(Denial::Expired), "the cache is bounded by exp");
    }

    #[test]
    fn refusals_say_nothing_of_the_token() {
        for denial in [Denial::NoCredentials, Denial::Expired, Denial::InsufficientScope, Denial::UnreadableRequest] {
            assert!(!denial.reason().contains('"'), "reasons go into JSON strings as they are");
            assert!(denial.challenge().starts_with("Bearer realm=\"fhir\""));
        }
        assert_eq!(Denial::InsufficientScope.status(), StatusCode::FORBIDDEN);
        assert_eq!(Denial::Expired.status(), StatusCode::UNAUTHORIZED);
    }
}
