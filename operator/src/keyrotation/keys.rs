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
