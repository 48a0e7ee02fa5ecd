//! The tests' OpenID provider (oidc-provider on node, `e2e/src/idp.rs`) as
//! SMART backend services clients see it: `client_credentials` tokens by
//! `private_key_jwt`, JWT access tokens that verify against its JWKS, scopes
//! limited to each client's own, a signing key rotation that a stale JWKS
//! does not know. No Kubernetes.

use std::process::Command;

use fhir_operator_e2e::idp::{BILLING_EXPORT, CLINICAL_PORTAL, Idp, IdpOptions, decode_unverified, verify};
use serde_json::{Value, json};

const FHIR_BASE: &str = "https://fhir.example.test/fhir";

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"].as_array().expect("keys").iter().filter_map(|k| k["kid"].as_str().map(str::to_owned)).collect()
}

#[test]
fn tokens_carry_the_resource_and_the_clients_scopes_and_verify_against_the_jwks_across_a_key_rotation() {
    let idp = Idp::start(IdpOptions::default()).expect("the OpenID provider");
    let issuer = idp.issuer();
    assert_eq!(idp.discovery()["token_endpoint"], idp.token_endpoint());
    assert!(
        idp.discovery()["grant_types_supported"].as_array().unwrap().contains(&json!("client_credentials")),
        "{}",
        idp.discovery()
    );
    assert_eq!(idp.discovery()["token_endpoint_auth_methods_supported"], json!(["private_key_jwt"]));
    let jwks = idp.jwks().expect("the JWKS");
    let first_kids = kids(&jwks);
    assert_eq!(first_kids.len(), 1, "{jwks}");

    for (client, scopes) in [
        (BILLING_EXPORT, vec!["system/Patient.rs", "system/*.cruds"]),
        (CLINICAL_PORTAL, vec!["system/Patient.rs", "system/Observation.read"]),
    ] {
        let token = idp.token(client, &scopes, FHIR_BASE).unwrap_or_else(|e| panic!("{e:#}\n{}", idp.log()));
        let (header, claims) = decode_unverified(&token).unwrap();
        eprintln!("{client}: header {header:?}, claims {claims}");
        assert_eq!(claims["iss"], issuer);
        assert_eq!(claims["aud"], FHIR_BASE);
        assert_eq!(claims["client_id"], client);
        assert_eq!(claims["scope"], scopes.join(" "));
        assert!(claims["exp"].as_u64().unwrap() > claims["iat"].as_u64().unwrap(), "{claims}");
        assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()), "{claims}");
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        let kid = header.kid.expect("a kid in the header");
        assert!(first_kids.contains(&kid), "kid {kid} not in {jwks}");
        let verified = verify(&token, &jwks, &issuer, FHIR_BASE).expect("the token verifies against the JWKS");
        assert_eq!(verified, claims);
        // Not for another audience.
        assert!(verify(&token, &jwks, &issuer, "https://other.example.test/fhir").is_err());
    }

    // A scope of the other client is refused; one no client has is not granted.
    let refused = idp.token(CLINICAL_PORTAL, &["system/*.cruds"], FHIR_BASE).unwrap_err();
    assert!(format!("{refused:#}").contains("invalid_scope"), "{refused:#}");
    let refused = idp.token(BILLING_EXPORT, &["system/Patient.rs", "system/Observation.read"], FHIR_BASE).unwrap_err();
    assert!(format!("{refused:#}").contains("invalid_scope"), "{refused:#}");
    let narrowed = idp.token(BILLING_EXPORT, &["system/Patient.rs", "system/Secret.cruds"], FHIR_BASE).unwrap();
    assert_eq!(decode_unverified(&narrowed).unwrap().1["scope"], "system/Patient.rs");

    // A client that is not registered, and a registered one with the wrong key.
    let forged = fhir_operator_e2e::idp::client_assertion(
        BILLING_EXPORT,
        idp.client_key_file(CLINICAL_PORTAL).unwrap(),
        idp.client_alg(CLINICAL_PORTAL).unwrap(),
        None,
        &idp.token_endpoint(),
    )
    .unwrap();
    let answer = Command::new("curl")
        .args(["--silent", "--cacert"])
        .arg(idp.ca_file())
        .args(["--data-urlencode", "grant_type=client_credentials", "--data-urlencode", "scope=system/Patient.rs"])
        .args(["--data-urlencode", "client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer"])
        .arg("--data-urlencode")
        .arg(format!("client_assertion={forged}"))
        .arg(idp.token_endpoint())
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert_eq!(answer["error"], "invalid_client", "{answer}");
    assert!(idp.token("nobody", &["system/Patient.rs"], FHIR_BASE).is_err());

    // Rotation: the new kid is unknown to the JWKS fetched before, known to
    // the one fetched after, which still has the old key.
    let before = idp.token(BILLING_EXPORT, &["system/Patient.rs"], FHIR_BASE).unwrap();
    let new_kid = idp.rotate_signing_key().expect("rotating the signing key");
    let token = idp.token(BILLING_EXPORT, &["system/Patient.rs"], FHIR_BASE).unwrap();
    let kid = decode_unverified(&token).unwrap().0.kid.unwrap();
    assert_eq!(kid, new_kid);
    assert!(!first_kids.contains(&kid), "the new kid {kid} was already in {jwks}");
    assert!(verify(&token, &jwks, &issuer, FHIR_BASE).is_err(), "the stale JWKS verified a token of the new key");
    let refreshed = idp.jwks().unwrap();
    assert!(kids(&refreshed).contains(&kid), "{refreshed}");
    assert!(kids(&refreshed).contains(&first_kids[0]), "the old key left the JWKS: {refreshed}");
    verify(&token, &refreshed, &issuer, FHIR_BASE).expect("the new token verifies against the refreshed JWKS");
    verify(&before, &refreshed, &issuer, FHIR_BASE).expect("a token of the old key still verifies");
}

#[test]
fn es256_signing() {
    let idp = Idp::start(IdpOptions { signing_alg: jsonwebtoken::Algorithm::ES256, ..IdpOptions::default() })
        .expect("the OpenID provider");
    let token = idp.token(CLINICAL_PORTAL, &["system/Observation.read"], FHIR_BASE).unwrap();
    let (header, _) = decode_unverified(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    verify(&token, &idp.jwks().unwrap(), &idp.issuer(), FHIR_BASE).expect("verifies");
}
