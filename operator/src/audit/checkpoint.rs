//! Checkpoints: what the sidecar vouches for at every seal, signed with the
//! endpoint's Ed25519 key, each naming the previous checkpoint's hash, and
//! the key pair itself.

use base64ct::{Base64, Encoding};
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain::sha256_hex;

/// Format of the checkpoints this code writes.
pub const VERSION: u32 = 1;
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Everything covered before a retention pruning, as the checkpoints after
/// it carry it forward: verify accepts that checkpoints up to
/// `through_index` (and their segments) are gone, and checks that what
/// remains starts exactly where they ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pruned {
    /// The newest checkpoint pruned, and its hash.
    pub through_index: u64,
    pub checkpoint_hash: String,
    /// The newest record pruned (0: none), and the chain head after it.
    pub through_seq: u64,
    pub head: String,
    /// The cutoff: everything pruned was sealed before it.
    pub before: String,
    /// When the sidecar decided the pruning (its seal time).
    pub at: String,
}

/// What one seal vouches for. Its canonical bytes (`serde_json::to_vec`,
/// field order as declared) are what is signed and hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub version: u32,
    /// The sidecar (one per gateway pod) whose chain this is.
    pub stream: String,
    /// 1, 2, 3...: the object name, without gaps.
    pub index: u64,
    /// Hash of the previous checkpoint's canonical bytes; 64 zeros for the first.
    pub prev_checkpoint: String,
    /// The segment object under the stream; empty when no record came in.
    pub segment: String,
    pub segment_sha256: String,
    /// Records `first_seq..=last_seq`; `count` 0 is `last_seq == first_seq - 1`.
    pub first_seq: u64,
    pub last_seq: u64,
    pub count: u64,
    /// Times of the first and last record (empty without records).
    pub first_time: String,
    pub last_time: String,
    /// SHA-256 of the last record's line: the chain head after this segment.
    pub head: String,
    /// The seal before this one and this seal: consecutive checkpoints'
    /// periods meet, so a missing checkpoint is a gap in time too.
    pub period_start: String,
    pub period_end: String,
    /// Cumulative: everything pruned so far, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Pruned>,
    /// The sidecar could not vouch for the access log's continuity before
    /// this segment (its file was replaced or truncated, or its state lost).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_reset: String,
    /// [`key_id`] of the signing key.
    pub key_id: String,
}

impl Checkpoint {
    pub fn canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// What the next checkpoint names as `prev_checkpoint`.
    pub fn hash(&self) -> String {
        sha256_hex(&self.canonical())
    }

    pub fn object_name(&self) -> String {
        checkpoint_name(self.index)
    }
}

pub fn checkpoint_name(index: u64) -> String {
    format!("{CHECKPOINTS_DIR}/{index:020}.json")
}

/// The index a checkpoint object name says, `checkpoints/<index>.json`.
pub fn index_of(name: &str) -> Option<u64> {
    name.rsplit('/').next()?.strip_suffix(".json")?.parse().ok()
}

/// A checkpoint object: the checkpoint and its Ed25519 signature (base64)
/// over the checkpoint's canonical bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    pub signature: String,
}

impl SignedCheckpoint {
    pub fn sign(checkpoint: Checkpoint, key: &SigningKey) -> Self {
        let signature = key.sign(&checkpoint.canonical());
        SignedCheckpoint { checkpoint, signature: Base64::encode_string(&signature.to_bytes()) }
    }

    pub fn verify(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = Base64::decode_vec(&self.signature) else { return false };
        let Ok(signature) = Signature::from_slice(&bytes) else { return false };
        key.verify_strict(&self.checkpoint.canonical(), &signature).is_ok()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }
}

/// An Ed25519 key pair as the operator keeps it: the private key in the
/// endpoint's Secret, the public key in status and a ConfigMap.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub private_pem: String,
    /// SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub public_pem: String,
    /// The 32 raw public-key bytes, base64.
    pub public_base64: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("public_base64", &self.public_base64).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    #[error("encoding the key: {0}")]
    Encode(String),
    /// Never quotes the input: it may be a private key.
    #[error("not an Ed25519 private key in PKCS#8 PEM")]
    PrivateKey,
    #[error("not an Ed25519 public key (SubjectPublicKeyInfo PEM, or 32 bytes in base64)")]
    PublicKey,
}

/// A new key pair from the operating system's random number generator.
pub fn generate_signing_key() -> Result<KeyPair, KeyError> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..]).map_err(KeyError::Random)?;
    let key = SigningKey::from_bytes(&seed);
    let private_pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| KeyError::Encode(e.to_string()))?.to_string();
    let public = key.verifying_key();
    let public_pem = public.to_public_key_pem(LineEnding::LF).map_err(|e| KeyError::Encode(e.to_string()))?;
    Ok(KeyPair { private_pem, public_pem, public_base64: Base64::encode_string(&public.to_bytes()) })
}

pub fn parse_signing_key(pem: &str) -> Result<SigningKey, KeyError> {
    SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| KeyError::PrivateKey)
}

/// A public key as PEM or as its 32 bytes in base64.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(text).map_err(|_| KeyError::PublicKey);
    }
    let bytes = Base64::decode_vec(text).map_err(|_| KeyError::PublicKey)?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| KeyError::PublicKey)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::PublicKey)
}

/// Names a public key in checkpoints: the first 16 hex digits of the
/// SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    sha256_hex(&key.to_bytes())[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            version: VERSION,
            stream: "patients-7d9f".into(),
            index: 1,
            prev_checkpoint: super::super::chain::GENESIS.into(),
            segment: "segments/x.jsonl".into(),
            segment_sha256: "ab".into(),
            first_seq: 1,
            last_seq: 2,
            count: 2,
            first_time: "2025-03-07T09:05:01Z".into(),
            last_time: "2025-03-07T09:05:02Z".into(),
            head: "cd".into(),
            period_start: "2025-03-07T09:00:00Z".into(),
            period_end: "2025-03-07T09:05:03Z".into(),
            pruned: None,
            source_reset: String::new(),
            key_id: "k".into(),
        }
    }

    #[test]
    fn generated_keys_parse_back_and_sign() {
        let pair = generate_signing_key().expect("generates");
        assert!(pair.private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{pair:?}").contains("PRIVATE"), "Debug never shows the private key");
        let key = parse_signing_key(&pair.private_pem).expect("private key parses");
        let public = parse_public_key(&pair.public_pem).expect("PEM parses");
        assert_eq!(public, parse_public_key(&pair.public_base64).expect("base64 parses"));
        assert_eq!(public, key.verifying_key());
        let signed = SignedCheckpoint::sign(sample(), &key);
        assert!(signed.verify(&public));
        let back: SignedCheckpoint = serde_json::from_slice(&signed.to_bytes()).expect("parses");
        assert!(back.verify(&public));
        let other = parse_signing_key(&generate_signing_key().expect("generates").private_pem).expect("parses");
        assert!(!signed.verify(&other.verifying_key()));
        let mut edited = signed.clone();
        edited.checkpoint.count = 3;
        assert!(!edited.verify(&public));
        assert!(parse_public_key("AAAA").is_err() && parse_signing_key(&pair.public_pem).is_err());
    }

    #[test]
    fn names_and_indexes() {
        assert_eq!(sample().object_name(), "checkpoints/00000000000000000001.json");
        assert_eq!(index_of("prod/a/checkpoints/00000000000000000042.json"), Some(42));
        assert_eq!(index_of("checkpoints/x.json"), None);
        assert!(serde_json::from_str::<Checkpoint>(r#"{"extra":1}"#).is_err());
    }
}
