//! Key material of a KeyRotationSchedule. It only ever lives in the
//! schedule's Secret: nothing here implements Display, and Debug redacts.
//!
//! Secret layout (data keys) for version N:
//! - `api-key`:     `v{N}.client.{client}`: the client's token, 43
//!   characters (base64url, no padding, of 32 random bytes)
//! - `hmac-sha256`: `v{N}.key`: 32 random bytes
//! - `aes-256`:     `v{N}.key`: 32 random bytes
//! - `ecdsa-p256`:  `v{N}.private.pem` (PKCS#8 PEM), `v{N}.public.pem`
//!   (SPKI PEM)
//!
//! plus, for `api-key`, `api-keys.map`: the gateway's map of every token of
//! every version the Secret holds (see `fhirendpoint::gateway::api_keys_map`).
//!
//! Pure functions over the Secret's `data`, no Kubernetes client. Random
//! bytes come from the operating system (`getrandom`), key pairs from the
//! RustCrypto `p256` crate. Buffers this module owns are zeroed when dropped;
//! [`KeyError`] messages name versions, clients and entries, never values.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use base64ct::{Base64UrlUnpadded, Encoding};
use k8s_openapi::ByteString;
use p256::ecdsa::{SigningKey, VerifyingKey};
use p256::elliptic_curve::Generate;
use p256::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use serde::Serialize;
use zeroize::{Zeroize, Zeroizing};

use crate::api::KeyAlgorithm;
use crate::fhirendpoint::gateway::{self, GatewayError};

/// Bytes of randomness in every symmetric key and API token (256 bits).
pub const KEY_BYTES: usize = 32;
/// Characters of an API token: base64url without padding of [`KEY_BYTES`].
pub const TOKEN_LEN: usize = 43;
/// The Secret entry holding the gateway's API-key map (`api-key` only).
pub const GATEWAY_MAP_ENTRY: &str = "api-keys.map";
/// Longest name Kubernetes accepts for a Secret data key.
const MAX_ENTRY_NAME_LEN: usize = 253;

/// The entry of a version's symmetric key (`hmac-sha256`, `aes-256`).
pub fn key_entry(version: i64) -> String {
    format!("v{version}.key")
}

/// The entry of a client's API token in a version (`api-key`).
pub fn client_entry(version: i64, client: &str) -> String {
    format!("v{version}.client.{client}")
}

/// The entry of a version's PKCS#8 PEM private key (`ecdsa-p256`).
pub fn private_pem_entry(version: i64) -> String {
    format!("v{version}.private.pem")
}

/// The entry of a version's SPKI PEM public key (`ecdsa-p256`).
pub fn public_pem_entry(version: i64) -> String {
    format!("v{version}.public.pem")
}

/// What cannot be generated or read. Messages name versions, client ids and
/// Secret entries, never a key, a token or any other value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key version {version} is invalid: versions start at 1")]
    InvalidVersion { version: i64 },
    #[error("algorithm api-key needs at least one client id")]
    NoClients,
    #[error("client ids are only allowed for algorithm api-key, not {algorithm}")]
    ClientsNotAllowed { algorithm: &'static str },
    #[error("client id {client:?} is listed more than once")]
    DuplicateClient { client: String },
    /// The gateway's rules for client ids and tokens (see
    /// `gateway::api_keys_map`); its messages never hold a key either.
    #[error("the gateway cannot use these API keys: {0}")]
    Gateway(#[from] GatewayError),
    #[error("Secret entry {entry:?} would be longer than {MAX_ENTRY_NAME_LEN} characters")]
    EntryNameTooLong { entry: String },
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("could not encode Secret entry {entry:?}")]
    Encoding { entry: String },
    #[error("the Secret has no entry {entry:?}")]
    Missing { entry: String },
    #[error("Secret entry {entry:?} is unusable: {reason}")]
    Malformed { entry: String, reason: &'static str },
}

/// The entries of one freshly generated version, to be added to the
/// schedule's Secret. Debug shows the version and the entry names only; the
/// values are zeroed when this is dropped (take them with
/// [`Generated::into_entries`]).
pub struct Generated {
    pub version: i64,
    entries: BTreeMap<String, ByteString>,
}

impl Generated {
    /// The Secret entries of this version.
    pub fn entries(&self) -> &BTreeMap<String, ByteString> {
        &self.entries
    }

    /// The Secret entries of this version, to move into the Secret's data.
    pub fn into_entries(mut self) -> BTreeMap<String, ByteString> {
        std::mem::take(&mut self.entries)
    }
}

impl fmt::Debug for Generated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generated").field("version", &self.version).field("entries", &self.entries.keys()).finish()
    }
}

impl Drop for Generated {
    fn drop(&mut self) {
        for value in self.entries.values_mut() {
            value.0.zeroize();
        }
    }
}

/// The entries of version `version` of a schedule with this algorithm (see
/// the layout above). `clients` is `spec.clients`: required for `api-key`
/// (each id listed once and valid for the gateway), refused otherwise.
pub fn generate(algorithm: KeyAlgorithm, clients: &[String], version: i64) -> Result<Generated, KeyError> {
    if version < 1 {
        return Err(KeyError::InvalidVersion { version });
    }
    let mut generated = Generated { version, entries: BTreeMap::new() };
    match algorithm {
        KeyAlgorithm::ApiKey => {
            if clients.is_empty() {
                return Err(KeyError::NoClients);
            }
            let mut pairs: Zeroizing<Vec<(String, String)>> = Zeroizing::new(Vec::with_capacity(clients.len()));
            for client in clients {
                if pairs.iter().any(|(_, seen)| seen == client) {
                    return Err(KeyError::DuplicateClient { client: client.clone() });
                }
                let token = Base64UrlUnpadded::encode_string(&random_bytes()?[..]);
                pairs.push((token, client.clone()));
            }
            // The gateway's own rules: client ids, token length and
            // alphabet, and no token given twice (compared ignoring case,
            // as nginx does).
            gateway::api_keys_map(&pairs)?.zeroize();
            for (token, client) in pairs.iter_mut() {
                let entry = client_entry(version, client);
                if entry.len() > MAX_ENTRY_NAME_LEN {
                    return Err(KeyError::EntryNameTooLong { entry });
                }
                generated.entries.insert(entry, ByteString(std::mem::take(token).into_bytes()));
            }
        }
        KeyAlgorithm::HmacSha256 | KeyAlgorithm::Aes256 => {
            refuse_clients(algorithm, clients)?;
            generated.entries.insert(key_entry(version), ByteString(random_bytes()?.to_vec()));
        }
        KeyAlgorithm::EcdsaP256 => {
            refuse_clients(algorithm, clients)?;
            let signing = SigningKey::try_generate().map_err(KeyError::Random)?;
            let private = signing
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|_| KeyError::Encoding { entry: private_pem_entry(version) })?;
            let public = signing
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .map_err(|_| KeyError::Encoding { entry: public_pem_entry(version) })?;
            generated.entries.insert(private_pem_entry(version), ByteString(private.as_bytes().to_vec()));
            generated.entries.insert(public_pem_entry(version), ByteString(public.into_bytes()));
        }
    }
    Ok(generated)
}

fn refuse_clients(algorithm: KeyAlgorithm, clients: &[String]) -> Result<(), KeyError> {
    if clients.is_empty() { Ok(()) } else { Err(KeyError::ClientsNotAllowed { algorithm: algorithm_name(algorithm) }) }
}

/// The name `spec.algorithm` spells.
pub fn algorithm_name(algorithm: KeyAlgorithm) -> &'static str {
    match algorithm {
        KeyAlgorithm::ApiKey => "api-key",
        KeyAlgorithm::HmacSha256 => "hmac-sha256",
        KeyAlgorithm::Aes256 => "aes-256",
        KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
    }
}

fn random_bytes() -> Result<Zeroizing<[u8; KEY_BYTES]>, KeyError> {
    let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
    getrandom::fill(&mut bytes[..]).map_err(KeyError::Random)?;
    Ok(bytes)
}

/// The version and the rest of a versioned entry name `v{N}.{rest}`: N in
/// decimal without leading zeros, at least 1, and `rest` not empty. Any
/// other name is not a versioned entry.
fn parse_entry(name: &str) -> Option<(i64, &str)> {
    let (digits, rest) = name.strip_prefix('v')?.split_once('.')?;
    if rest.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, rest))
}

/// The version of a versioned entry name `v{N}.…`, if it is one.
pub fn entry_version(name: &str) -> Option<i64> {
    parse_entry(name).map(|(version, _)| version)
}

/// The client ids that have a token in `version` (`api-key`).
pub fn clients_of(data: &BTreeMap<String, ByteString>, version: i64) -> BTreeSet<String> {
    data.keys()
        .filter_map(|name| parse_entry(name))
        .filter(|(v, _)| *v == version)
        .filter_map(|(_, rest)| rest.strip_prefix("client."))
        .map(str::to_owned)
        .collect()
}

/// Removes (and zeroes) the token entries of clients not in `clients`,
/// in every version.
pub fn revoke_other_clients(data: &mut BTreeMap<String, ByteString>, clients: &[String]) {
    let revoked: Vec<String> = data
        .keys()
        .filter(|name| {
            parse_entry(name)
                .and_then(|(_, rest)| rest.strip_prefix("client."))
                .is_some_and(|client| !clients.iter().any(|c| c == client))
        })
        .cloned()
        .collect();
    for name in revoked {
        if let Some(mut value) = data.remove(&name) {
            value.0.zeroize();
        }
    }
}

/// The entries of the current version again under `current.{rest}`
/// (`current.client.{client}`, `current.key`, `current.private.pem`, ...),
/// so that a client reads its key without looking up the version first.
pub fn current_aliases(data: &BTreeMap<String, ByteString>, current: i64) -> BTreeMap<String, ByteString> {
    data.iter()
        .filter_map(|(name, value)| {
            let (version, rest) = parse_entry(name)?;
            (version == current).then(|| (format!("{CURRENT_PREFIX}{rest}"), value.clone()))
        })
        .collect()
}

/// Prefix of the entries that repeat the current version's.
pub const CURRENT_PREFIX: &str = "current.";

/// The versions the Secret holds entries of. Names that are not `v{N}.…`
/// (such as `api-keys.map`) or are malformed are ignored.
pub fn versions(data: &BTreeMap<String, ByteString>) -> BTreeSet<i64> {
    data.keys().filter_map(|name| parse_entry(name)).map(|(version, _)| version).collect()
}

/// Removes (and zeroes) every versioned entry whose version is not in
/// `keep`; entries that are not versioned stay.
pub fn retain_versions(data: &mut BTreeMap<String, ByteString>, keep: &BTreeSet<i64>) {
    let retired: Vec<String> = data
        .keys()
        .filter(|name| parse_entry(name).is_some_and(|(version, _)| !keep.contains(&version)))
        .cloned()
        .collect();
    for name in retired {
        if let Some(mut value) = data.remove(&name) {
            value.0.zeroize();
        }
    }
}

/// Every (token, client id) pair of every version the Secret holds, in
/// entry order, for `gateway::api_keys_map` (e.g. to merge the keys of
/// several schedules into one map). Zeroed when dropped.
pub fn api_key_pairs(data: &BTreeMap<String, ByteString>) -> Result<Zeroizing<Vec<(String, String)>>, KeyError> {
    let mut pairs = Zeroizing::new(Vec::new());
    for (name, value) in data {
        let Some(client) = parse_entry(name).and_then(|(_, rest)| rest.strip_prefix("client.")) else {
            continue;
        };
        let token = std::str::from_utf8(&value.0)
            .map_err(|_| KeyError::Malformed { entry: name.clone(), reason: "the token is not UTF-8" })?;
        pairs.push((token.to_owned(), client.to_owned()));
    }
    Ok(pairs)
}

/// The content of [`GATEWAY_MAP_ENTRY`]: every client token of every version
/// the Secret holds, rendered by `gateway::api_keys_map`.
pub fn gateway_map(data: &BTreeMap<String, ByteString>) -> Result<String, KeyError> {
    Ok(gateway::api_keys_map(&api_key_pairs(data)?)?)
}

/// A JSON Web Key (RFC 7517, RFC 7518 section 6.2): public members only.
#[derive(Serialize)]
struct Jwk {
    kty: &'static str,
    crv: &'static str,
    x: String,
    y: String,
    #[serde(rename = "use")]
    use_: &'static str,
    alg: &'static str,
    kid: String,
}

#[derive(Serialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

/// The JSON Web Key Set of the public key of every `ecdsa-p256` version the
/// Secret holds, by version, kid `{schedule}-v{N}`. Only ever reads the
/// `v{N}.public.pem` entries; a version with a private key but no (or an
/// unreadable) public key is an error rather than a silently shorter set.
pub fn jwks(schedule: &str, data: &BTreeMap<String, ByteString>) -> Result<String, KeyError> {
    let mut keys = Vec::new();
    for version in versions(data) {
        let entry = public_pem_entry(version);
        let Some(pem) = data.get(&entry) else {
            if data.contains_key(&private_pem_entry(version)) {
                return Err(KeyError::Missing { entry });
            }
            continue;
        };
        let unusable = |reason| KeyError::Malformed { entry: entry.clone(), reason };
        let pem = std::str::from_utf8(&pem.0).map_err(|_| unusable("the public key is not UTF-8"))?;
        let key = VerifyingKey::from_public_key_pem(pem)
            .map_err(|_| unusable("the public key is not an SPKI PEM P-256 key"))?;
        let point = key.to_sec1_point(false);
        let (Some(x), Some(y)) = (point.x(), point.y()) else {
            return Err(unusable("the public key has no affine coordinates"));
        };
        keys.push(Jwk {
            kty: "EC",
            crv: "P-256",
            x: Base64UrlUnpadded::encode_string(x),
            y: Base64UrlUnpadded::encode_string(y),
            use_: "sig",
            alg: "ES256",
            kid: format!("{schedule}-v{version}"),
        });
    }
    serde_json::to_string(&Jwks { keys }).map_err(|_| KeyError::Encoding { entry: "jwks".to_owned() })
}

/// The API token of `client` in `version`, checked to be [`TOKEN_LEN`]
/// base64url characters of [`KEY_BYTES`] bytes.
pub fn client_token<'a>(
    data: &'a BTreeMap<String, ByteString>,
    version: i64,
    client: &str,
) -> Result<&'a str, KeyError> {
    let entry = client_entry(version, client);
    let value = data.get(&entry).ok_or_else(|| KeyError::Missing { entry: entry.clone() })?;
    let token = std::str::from_utf8(&value.0)
        .ok()
        .filter(|token| token.len() == TOKEN_LEN)
        .filter(|token| {
            let mut bytes = Zeroizing::new([0u8; KEY_BYTES]);
            Base64UrlUnpadded::decode(token, &mut bytes[..]).is_ok_and(|decoded| decoded.len() == KEY_BYTES)
        })
        .ok_or(KeyError::Malformed { entry, reason: "the token is not 43 base64url characters" })?;
    Ok(token)
}

/// The 32-byte symmetric key of `version` (`hmac-sha256`, `aes-256`), e.g.
/// the data encryption key of a backup.
pub fn symmetric_key(data: &BTreeMap<String, ByteString>, version: i64) -> Result<&[u8; KEY_BYTES], KeyError> {
    let entry = key_entry(version);
    let value = data.get(&entry).ok_or_else(|| KeyError::Missing { entry: entry.clone() })?;
    value.0.as_slice().try_into().map_err(|_| KeyError::Malformed { entry, reason: "the key is not 32 bytes" })
}
