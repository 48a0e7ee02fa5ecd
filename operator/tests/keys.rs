//! Key generation and the Secret helpers of `keyrotation::keys`, with real
//! crypto: the generated keys are loaded, used and checked with the RustCrypto
//! crates (p256, hmac, aes-gcm), and the gateway's own rules.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, Nonce};
use base64ct::{Base64, Base64UrlUnpadded, Encoding};
use fhir_operator::api::KeyAlgorithm;
use fhir_operator::fhirendpoint::gateway::{self, GatewayError};
use fhir_operator::keyrotation::keys::{self, Generated, KeyError};
use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::ByteString;
use p256::ecdsa::signature::{Signer, Verifier};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey};
use sha2::Sha256;

type Data = BTreeMap<String, ByteString>;

fn clients(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|id| (*id).to_owned()).collect()
}

fn generate(algorithm: KeyAlgorithm, ids: &[&str], version: i64) -> Generated {
    keys::generate(algorithm, &clients(ids), version).expect("generate")
}

/// A Secret's data holding the given versions of one algorithm.
fn secret(algorithm: KeyAlgorithm, ids: &[&str], versions: &[i64]) -> Data {
    let mut data = Data::new();
    for &version in versions {
        data.extend(generate(algorithm, ids, version).into_entries());
    }
    data
}

fn text(value: &ByteString) -> &str {
    std::str::from_utf8(&value.0).expect("UTF-8")
}

fn is_base64url(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The base64 body of a PEM document (the lines between BEGIN and END).
fn pem_body(pem: &str) -> Vec<&str> {
    pem.lines().filter(|line| !line.starts_with("-----") && !line.is_empty()).collect()
}

/// Renderings of a secret value a leak could take: the text itself and its
/// long lines (PEM bodies), hex, base64, base64url and Rust's Debug of the
/// bytes. Shorter than 16 characters never counts (no false positives).
fn leak_forms(value: &[u8]) -> Vec<String> {
    let mut forms = vec![
        hex::encode(value),
        Base64::encode_string(value),
        Base64UrlUnpadded::encode_string(value),
        format!("{value:?}"),
    ];
    if let Ok(text) = std::str::from_utf8(value) {
        forms.push(text.to_owned());
        forms.extend(pem_body(text).into_iter().map(str::to_owned));
        if let Ok(key) = SigningKey::from_pkcs8_pem(text) {
            let scalar = key.to_bytes();
            forms.push(hex::encode(scalar));
            forms.push(Base64::encode_string(&scalar));
            forms.push(Base64UrlUnpadded::encode_string(&scalar));
            forms.push(format!("{:?}", scalar.as_slice()));
        }
    }
    forms.retain(|form| form.len() >= 16);
    forms
}

fn assert_no_leak(haystack: &str, values: &[Vec<u8>], what: &str) {
    for value in values {
        for form in leak_forms(value) {
            assert!(!haystack.contains(&form), "{what} shows key material: {haystack}");
        }
    }
}

fn values(data: &Data) -> Vec<Vec<u8>> {
    data.values().map(|value| value.0.clone()).collect()
}

#[test]
fn api_key_tokens_are_43_base64url_characters_of_32_bytes() {
    let generated = generate(KeyAlgorithm::ApiKey, &["alice", "bob", "etl-job"], 7);
    assert_eq!(generated.version, 7);
    let names: Vec<&str> = generated.entries().keys().map(String::as_str).collect();
    assert_eq!(names, ["v7.client.alice", "v7.client.bob", "v7.client.etl-job"]);
    for value in generated.entries().values() {
        let token = text(value);
        assert_eq!(token.len(), keys::TOKEN_LEN);
        assert!(is_base64url(token), "token outside the base64url alphabet");
        let bytes = Base64UrlUnpadded::decode_vec(token).expect("base64url");
        assert_eq!(bytes.len(), keys::KEY_BYTES);
        assert_ne!(bytes, [0u8; 32]);
    }
}

#[test]
fn api_key_tokens_are_distinct_across_clients_and_versions() {
    let ids = ["a", "b", "c", "d", "e"];
    let mut seen = HashSet::new();
    let mut seen_ignoring_case = HashSet::new();
    for version in 1..=200 {
        for value in generate(KeyAlgorithm::ApiKey, &ids, version).entries().values() {
            let token = text(value).to_owned();
            assert!(seen_ignoring_case.insert(token.to_ascii_lowercase()), "token repeated (ignoring case)");
            assert!(seen.insert(token), "token repeated");
        }
    }
    assert_eq!(seen.len(), 1000);
}

#[test]
fn the_gateway_accepts_the_generated_tokens() {
    let generated = generate(KeyAlgorithm::ApiKey, &["alice", "bob"], 1);
    let pairs: Vec<(String, String)> = generated
        .entries()
        .iter()
        .map(|(name, value)| (text(value).to_owned(), name.trim_start_matches("v1.client.").to_owned()))
        .collect();
    let map = gateway::api_keys_map(&pairs).expect("the gateway accepts the tokens");
    for (token, client) in &pairs {
        assert!(map.contains(&format!("\"{token}\" \"{client}\";\n")));
    }
}

#[test]
fn gateway_map_holds_every_token_of_every_version() {
    let mut data = secret(KeyAlgorithm::ApiKey, &["alice", "bob"], &[1, 2, 3]);
    data.insert(keys::GATEWAY_MAP_ENTRY.to_owned(), ByteString(b"# stale map".to_vec()));
    let map = keys::gateway_map(&data).expect("gateway map");
    let lines = map.lines().filter(|line| !line.starts_with('#')).count();
    assert_eq!(lines, 6, "two clients times three versions");
    for version in [1, 2, 3] {
        for client in ["alice", "bob"] {
            let token = keys::client_token(&data, version, client).expect("token");
            assert!(map.contains(&format!("\"{token}\" \"{client}\";\n")));
        }
    }
    assert!(!map.contains("stale"));
    // The same pairs straight through the gateway give the same bytes.
    let pairs = keys::api_key_pairs(&data).expect("pairs");
    assert_eq!(pairs.len(), 6);
    assert_eq!(gateway::api_keys_map(&pairs).expect("map"), map);

    // A retired version's tokens leave the map.
    let retired = keys::client_token(&data, 1, "alice").expect("token").to_owned();
    keys::retain_versions(&mut data, &BTreeSet::from([2, 3]));
    let map = keys::gateway_map(&data).expect("gateway map");
    assert!(!map.contains(&retired));
    assert_eq!(map.lines().filter(|line| !line.starts_with('#')).count(), 4);

    // A Secret of another algorithm has no tokens: an empty map.
    let map = keys::gateway_map(&secret(KeyAlgorithm::HmacSha256, &[], &[1])).expect("map");
    assert_eq!(map.lines().filter(|line| !line.starts_with('#')).count(), 0);
}

#[test]
fn generate_refuses_bad_input_naming_it() {
    let err = |algorithm, ids: &[&str], version| keys::generate(algorithm, &clients(ids), version).unwrap_err();
    assert_eq!(err(KeyAlgorithm::ApiKey, &[], 1), KeyError::NoClients);
    assert_eq!(err(KeyAlgorithm::ApiKey, &["a", "b", "a"], 1), KeyError::DuplicateClient { client: "a".into() });
    for bad in ["", "a b", "a\"b", "a;b", "a/b", "$x"] {
        assert_eq!(
            err(KeyAlgorithm::ApiKey, &["ok", bad], 1),
            KeyError::Gateway(GatewayError::InvalidClientId { client: bad.into() }),
            "client id {bad:?}"
        );
    }
    let long = "c".repeat(250);
    assert_eq!(
        err(KeyAlgorithm::ApiKey, &[&long], 1),
        KeyError::EntryNameTooLong { entry: format!("v1.client.{long}") }
    );
    for algorithm in [KeyAlgorithm::HmacSha256, KeyAlgorithm::Aes256, KeyAlgorithm::EcdsaP256] {
        assert!(matches!(err(algorithm, &["a"], 1), KeyError::ClientsNotAllowed { .. }));
    }
    assert_eq!(
        err(KeyAlgorithm::HmacSha256, &["a"], 1).to_string(),
        "client ids are only allowed for algorithm api-key, not hmac-sha256"
    );
    for algorithm in [KeyAlgorithm::ApiKey, KeyAlgorithm::HmacSha256, KeyAlgorithm::Aes256, KeyAlgorithm::EcdsaP256] {
        for version in [0, -1, i64::MIN] {
            assert_eq!(err(algorithm, &["a"], version), KeyError::InvalidVersion { version });
        }
    }
}

#[test]
fn symmetric_keys_are_32_random_bytes() {
    for algorithm in [KeyAlgorithm::HmacSha256, KeyAlgorithm::Aes256] {
        let mut seen = HashSet::new();
        for version in 1..=100 {
            let generated = generate(algorithm, &[], version);
            let names: Vec<&str> = generated.entries().keys().map(String::as_str).collect();
            assert_eq!(names, [format!("v{version}.key")]);
            let key = &generated.entries()[&keys::key_entry(version)].0;
            assert_eq!(key.len(), keys::KEY_BYTES);
            assert_ne!(key.as_slice(), [0u8; 32]);
            assert!(seen.insert(key.clone()), "key repeated");
        }
    }
}

#[test]
fn hmac_sha256_with_the_generated_key_verifies() {
    let data = secret(KeyAlgorithm::HmacSha256, &[], &[1, 2]);
    let key = keys::symmetric_key(&data, 1).expect("key");
    let message = b"Patient/123/_history/4";
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC key");
    mac.update(message);
    let tag = mac.finalize().into_bytes();

    let mut check = Hmac::<Sha256>::new_from_slice(key).expect("HMAC key");
    check.update(message);
    check.verify_slice(&tag).expect("the tag verifies with the same key");

    let other = keys::symmetric_key(&data, 2).expect("key");
    let mut check = Hmac::<Sha256>::new_from_slice(other).expect("HMAC key");
    check.update(message);
    assert!(check.verify_slice(&tag).is_err(), "another version's key must not verify");
}

#[test]
fn aes_256_gcm_round_trips_with_the_generated_key() {
    let data = secret(KeyAlgorithm::Aes256, &[], &[1, 2]);
    let cipher = Aes256Gcm::new_from_slice(keys::symmetric_key(&data, 1).expect("key")).expect("AES-256 key");
    let nonce = Nonce::<Aes256Gcm>::from([7u8; 12]);
    let plaintext = b"pg_dump of the FHIR database".as_slice();
    let sealed = cipher.encrypt(&nonce, plaintext).expect("encrypt");
    assert_ne!(&sealed[..plaintext.len()], plaintext);
    assert_eq!(cipher.decrypt(&nonce, sealed.as_slice()).expect("decrypt"), plaintext);

    let other = Aes256Gcm::new_from_slice(keys::symmetric_key(&data, 2).expect("key")).expect("AES-256 key");
    assert!(other.decrypt(&nonce, sealed.as_slice()).is_err(), "another version's key must not decrypt");
}

#[test]
fn ecdsa_pems_load_with_p256_and_match() {
    let mut publics = HashSet::new();
    for version in 1..=20 {
        let generated = generate(KeyAlgorithm::EcdsaP256, &[], version);
        let names: Vec<&str> = generated.entries().keys().map(String::as_str).collect();
        assert_eq!(names, [format!("v{version}.private.pem"), format!("v{version}.public.pem")]);
        let private = text(&generated.entries()[&keys::private_pem_entry(version)]);
        let public = text(&generated.entries()[&keys::public_pem_entry(version)]);
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8, not SEC1");
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----\n"), "SPKI");
        let signing = SigningKey::from_pkcs8_pem(private).expect("PKCS#8 private PEM");
        let verifying = VerifyingKey::from_public_key_pem(public).expect("SPKI public PEM");
        assert_eq!(signing.verifying_key(), &verifying, "the public key is the private key's");
        let signature: Signature = signing.sign(b"a FHIR Bundle");
        verifying.verify(b"a FHIR Bundle", &signature).expect("verifies");
        assert!(verifying.verify(b"another Bundle", &signature).is_err());
        assert!(publics.insert(public.to_owned()), "key pair repeated");
    }
}

/// A P-256 verifying key from a JWK's base64url `x` and `y`.
fn verifying_key_from_jwk(jwk: &serde_json::Value) -> VerifyingKey {
    let coordinate = |name: &str| {
        let bytes = Base64UrlUnpadded::decode_vec(jwk[name].as_str().expect("coordinate")).expect("base64url");
        assert_eq!(bytes.len(), 32, "{name} is a 32-byte coordinate");
        bytes
    };
    let mut point = vec![0x04];
    point.extend(coordinate("x"));
    point.extend(coordinate("y"));
    VerifyingKey::from_sec1_bytes(&point).expect("a point on P-256")
}

#[test]
fn jwks_verifies_a_signature_made_with_the_private_key() {
    // 2 and 10: versions sort as numbers, not as strings.
    let data = secret(KeyAlgorithm::EcdsaP256, &[], &[10, 2]);
    let jwks: serde_json::Value = serde_json::from_str(&keys::jwks("signing", &data).expect("jwks")).expect("JSON");
    let set = jwks.as_object().expect("object");
    assert_eq!(set.keys().collect::<Vec<_>>(), ["keys"]);
    let jwks = jwks["keys"].as_array().expect("keys");
    assert_eq!(jwks.len(), 2);
    for (jwk, version) in jwks.iter().zip([2, 10]) {
        let members: BTreeSet<&str> = jwk.as_object().expect("JWK").keys().map(String::as_str).collect();
        assert_eq!(members, BTreeSet::from(["kty", "crv", "x", "y", "use", "alg", "kid"]));
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "ES256");
        assert_eq!(jwk["kid"], format!("signing-v{version}"));
        assert!(is_base64url(jwk["x"].as_str().expect("x")) && is_base64url(jwk["y"].as_str().expect("y")));

        let from_jwks = verifying_key_from_jwk(jwk);
        let private = text(&data[&keys::private_pem_entry(version)]);
        let signing = SigningKey::from_pkcs8_pem(private).expect("private PEM");
        let signature: Signature = signing.sign(b"Bundle/abc");
        from_jwks.verify(b"Bundle/abc", &signature).expect("the JWKS key verifies the version's signature");
        assert!(from_jwks.verify(b"Bundle/abd", &signature).is_err());

        let other = if version == 2 { 10 } else { 2 };
        let signing = SigningKey::from_pkcs8_pem(text(&data[&keys::private_pem_entry(other)])).expect("PEM");
        let signature: Signature = signing.sign(b"Bundle/abc");
        assert!(from_jwks.verify(b"Bundle/abc", &signature).is_err(), "another version's signature must fail");
    }
}

#[test]
fn jwks_holds_no_private_material() {
    let data = secret(KeyAlgorithm::EcdsaP256, &[], &[1, 2, 3]);
    let jwks = keys::jwks("signing", &data).expect("jwks");
    let parsed: serde_json::Value = serde_json::from_str(&jwks).expect("JSON");
    for jwk in parsed["keys"].as_array().expect("keys") {
        assert!(jwk.get("d").is_none(), "a JWK with a private member");
    }
    assert!(!jwks.contains("\"d\""));
    assert!(!jwks.contains("PRIVATE"));
    let privates: Vec<Vec<u8>> = (1..=3).map(|version| data[&keys::private_pem_entry(version)].0.clone()).collect();
    assert_no_leak(&jwks, &privates, "the JWKS");
    // The body of the private PEM as one string, too.
    for private in &privates {
        let body: String = pem_body(std::str::from_utf8(private).expect("PEM")).concat();
        assert!(!jwks.contains(&body));
    }
}

#[test]
fn jwks_is_deterministic_and_reads_only_ecdsa_versions() {
    let mut data = secret(KeyAlgorithm::EcdsaP256, &[], &[1, 2]);
    let jwks = keys::jwks("s", &data).expect("jwks");
    assert_eq!(keys::jwks("s", &data).expect("jwks"), jwks, "same Secret, same bytes");
    assert!(jwks.starts_with(r#"{"keys":[{"kty":"EC","crv":"P-256","x":""#), "{jwks}");

    // Entries of other kinds (and of a version with no key pair) are ignored.
    data.insert(keys::GATEWAY_MAP_ENTRY.to_owned(), ByteString(b"# map".to_vec()));
    data.insert("v3.key".to_owned(), ByteString(vec![1; 32]));
    data.insert("notes".to_owned(), ByteString(b"x".to_vec()));
    assert_eq!(keys::jwks("s", &data).expect("jwks"), jwks);

    assert_eq!(keys::jwks("s", &Data::new()).expect("jwks"), r#"{"keys":[]}"#);
    assert_eq!(keys::jwks("s", &secret(KeyAlgorithm::ApiKey, &["a"], &[1])).expect("jwks"), r#"{"keys":[]}"#);
}

#[test]
fn jwks_refuses_a_version_it_cannot_publish() {
    let mut data = secret(KeyAlgorithm::EcdsaP256, &[], &[1, 2]);
    let public = data.remove(&keys::public_pem_entry(2)).expect("public PEM");
    assert_eq!(keys::jwks("s", &data).unwrap_err(), KeyError::Missing { entry: "v2.public.pem".into() });

    data.insert(keys::public_pem_entry(2), data[&keys::private_pem_entry(2)].clone());
    let err = keys::jwks("s", &data).unwrap_err();
    assert!(matches!(&err, KeyError::Malformed { entry, .. } if entry == "v2.public.pem"), "{err}");
    assert_no_leak(&err.to_string(), &values(&data), "the error");
    assert_no_leak(&format!("{err:?}"), &values(&data), "the error's Debug");

    data.insert(keys::public_pem_entry(2), ByteString(vec![0xff, 0xfe]));
    assert!(matches!(keys::jwks("s", &data).unwrap_err(), KeyError::Malformed { .. }));

    data.insert(keys::public_pem_entry(2), public);
    assert!(keys::jwks("s", &data).is_ok());
}

#[test]
fn versions_reads_v_n_prefixes_and_ignores_other_names() {
    let data: Data = [
        "v1.key",
        "v2.client.alice",
        "v10.private.pem",
        "v10.public.pem",
        "api-keys.map",
        "v0.key",
        "v01.key",
        "v.key",
        "vx.key",
        "v3",
        "v4.",
        "v-1.key",
        "v+5.key",
        "V6.key",
        "v99999999999999999999.key",
        "x7.key",
    ]
    .into_iter()
    .map(|name| (name.to_owned(), ByteString(b"x".to_vec())))
    .collect();
    assert_eq!(keys::versions(&data), BTreeSet::from([1, 2, 10]));
    assert_eq!(keys::versions(&Data::new()), BTreeSet::new());
}

#[test]
fn retain_versions_drops_only_the_versions_not_kept() {
    let mut data = secret(KeyAlgorithm::ApiKey, &["a", "b"], &[1, 2, 3, 4]);
    for other in ["api-keys.map", "v0.key", "v01.key", "notes"] {
        data.insert(other.to_owned(), ByteString(b"x".to_vec()));
    }
    let kept_token = keys::client_token(&data, 3, "a").expect("token").to_owned();
    keys::retain_versions(&mut data, &BTreeSet::from([3, 4, 9]));
    assert_eq!(keys::versions(&data), BTreeSet::from([3, 4]));
    let names: Vec<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["api-keys.map", "notes", "v0.key", "v01.key", "v3.client.a", "v3.client.b", "v4.client.a", "v4.client.b"]
    );
    assert_eq!(keys::client_token(&data, 3, "a").expect("token"), kept_token);

    keys::retain_versions(&mut data, &BTreeSet::new());
    assert_eq!(keys::versions(&data), BTreeSet::new());
    assert_eq!(data.len(), 4, "unversioned entries stay");
}

#[test]
fn accessors_return_the_generated_values_and_refuse_bad_entries() {
    let mut data = secret(KeyAlgorithm::ApiKey, &["alice"], &[1]);
    let token = keys::client_token(&data, 1, "alice").expect("token");
    assert_eq!(token.as_bytes(), data["v1.client.alice"].0.as_slice());
    assert_eq!(
        keys::client_token(&data, 2, "alice").unwrap_err(),
        KeyError::Missing { entry: "v2.client.alice".into() }
    );
    assert_eq!(keys::client_token(&data, 1, "bob").unwrap_err(), KeyError::Missing { entry: "v1.client.bob".into() });
    for bad in [&b"short"[..], &[b'A'; 44][..], &[b'!'; 43][..], &[0xff; 43][..]] {
        data.insert("v1.client.alice".into(), ByteString(bad.to_vec()));
        assert!(matches!(keys::client_token(&data, 1, "alice").unwrap_err(), KeyError::Malformed { .. }));
    }

    let mut data = secret(KeyAlgorithm::Aes256, &[], &[1]);
    assert_eq!(keys::symmetric_key(&data, 1).expect("key").as_slice(), data["v1.key"].0.as_slice());
    assert_eq!(keys::symmetric_key(&data, 2).unwrap_err(), KeyError::Missing { entry: "v2.key".into() });
    data.insert("v1.key".into(), ByteString(vec![1; 31]));
    assert!(matches!(keys::symmetric_key(&data, 1).unwrap_err(), KeyError::Malformed { .. }));
}

#[test]
fn gateway_map_refuses_unusable_tokens_without_showing_them() {
    let data = secret(KeyAlgorithm::ApiKey, &["alice", "bob"], &[1, 2]);
    let secrets = values(&data);

    let mut short = data.clone();
    let token = keys::client_token(&data, 1, "alice").expect("token");
    short.insert("v1.client.alice".into(), ByteString(token.as_bytes()[..24].to_vec()));
    let mut shown = secrets.clone();
    shown.push(token.as_bytes()[..24].to_vec());
    let err = keys::gateway_map(&short).unwrap_err();
    assert!(matches!(err, KeyError::Gateway(GatewayError::InvalidApiKey { ref client, .. }) if client == "alice"));
    assert_no_leak(&err.to_string(), &shown, "the error");
    assert_no_leak(&format!("{err:?}"), &shown, "the error's Debug");

    // One token given to two clients (nginx compares ignoring case).
    let mut shared = data.clone();
    shared.insert("v2.client.bob".into(), ByteString(token.to_ascii_lowercase().into_bytes()));
    shared.insert("v2.client.alice".into(), ByteString(token.to_ascii_uppercase().into_bytes()));
    let err = keys::gateway_map(&shared).unwrap_err();
    assert!(matches!(err, KeyError::Gateway(GatewayError::DuplicateApiKey { .. })), "{err}");
    let mut shown = values(&shared);
    shown.push(token.as_bytes().to_vec());
    assert_no_leak(&err.to_string(), &shown, "the error");
    assert_no_leak(&format!("{err:?}"), &shown, "the error's Debug");

    let mut binary = data.clone();
    binary.insert("v1.client.alice".into(), ByteString(vec![0xff; 43]));
    assert_eq!(
        keys::gateway_map(&binary).unwrap_err(),
        KeyError::Malformed { entry: "v1.client.alice".into(), reason: "the token is not UTF-8" }
    );
}

/// The canary: Debug of what `generate` returns, and every error raised
/// over a Secret holding real keys, show none of the keys.
#[test]
fn debug_and_errors_never_show_key_material() {
    let all = [
        (KeyAlgorithm::ApiKey, &["alice", "bob"][..]),
        (KeyAlgorithm::HmacSha256, &[][..]),
        (KeyAlgorithm::Aes256, &[][..]),
        (KeyAlgorithm::EcdsaP256, &[][..]),
    ];
    for (algorithm, ids) in all {
        let generated = generate(algorithm, ids, 5);
        let secrets = values(generated.entries());
        assert!(!secrets.is_empty());
        let debug = format!("{generated:?}");
        assert_no_leak(&debug, &secrets, "Debug of Generated");
        assert!(debug.starts_with("Generated { version: 5, entries: ["), "{debug}");
        for name in generated.entries().keys() {
            assert!(debug.contains(&format!("{name:?}")), "Debug names the entries: {debug}");
        }
        let alternate = format!("{generated:#?}");
        assert_no_leak(&alternate, &secrets, "alternate Debug of Generated");

        // Every error these helpers raise over this Secret, and corrupted copies.
        let mut data = generated.into_entries();
        data.insert("v6.private.pem".into(), data.values().next().expect("entry").clone());
        let mut errors = vec![
            keys::jwks("s", &data).err(),
            keys::client_token(&data, 5, "carol").err(),
            keys::client_token(&data, 6, "alice").err(),
            keys::symmetric_key(&data, 6).err(),
        ];
        for entry in data.keys().cloned().collect::<Vec<_>>() {
            let mut corrupted = data.clone();
            let value = &mut corrupted.get_mut(&entry).expect("entry").0;
            value.truncate(value.len() - 1);
            errors.push(keys::client_token(&corrupted, 5, "alice").err());
            errors.push(keys::symmetric_key(&corrupted, 5).err());
            errors.push(keys::jwks("s", &corrupted).err());
            errors.push(keys::gateway_map(&corrupted).err());
            let mut renamed = data.clone();
            let value = renamed.remove(&entry).expect("entry");
            renamed.insert("v5.client.bad id".into(), value);
            errors.push(keys::gateway_map(&renamed).err());
        }
        let errors: Vec<KeyError> = errors.into_iter().flatten().collect();
        assert!(errors.len() >= 4, "{algorithm:?}: the corruptions raise errors");
        let mut secrets = values(&data);
        for value in values(&data) {
            secrets.push(value[..value.len() - 1].to_vec());
        }
        for err in &errors {
            assert_no_leak(&err.to_string(), &secrets, "a KeyError");
            assert_no_leak(&format!("{err:?}"), &secrets, "Debug of a KeyError");
        }
    }
}
