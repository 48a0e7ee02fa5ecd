//! The tests' OpenID provider (oidc-provider on node, `e2e/src/idp.rs`) as
//! SMART backend services clients see it: `client_credentials` tokens by
//! `private_key_jwt`, JWT access tokens that verify against its JWKS, scopes
//! limited to each client's own, a signing key rotation that a stale JWKS
//! does not know; and PyPI fhirclient getting a token through discovery.
//! No Kubernetes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fhir_operator_e2e::idp::{
    BILLING_EXPORT, CLINICAL_PORTAL, Idp, IdpOptions, SmartSteps, decode_unverified, fhirclient_backend_services,
    verify,
};
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
fn es256_signing_and_a_default_resource() {
    let mut idp = Idp::start(IdpOptions { signing_alg: jsonwebtoken::Algorithm::ES256, ..IdpOptions::default() })
        .expect("the OpenID provider");
    let token = idp.token(CLINICAL_PORTAL, &["system/Observation.read"], FHIR_BASE).unwrap();
    let (header, _) = decode_unverified(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    verify(&token, &idp.jwks().unwrap(), &idp.issuer(), FHIR_BASE).expect("verifies");
    // Asked for without a resource, a token is for the default resource.
    idp.set_default_resource(FHIR_BASE).expect("a default resource");
    let token = idp.token(CLINICAL_PORTAL, &["system/Observation.read"], "").unwrap();
    verify(&token, &idp.jwks().unwrap(), &idp.issuer(), FHIR_BASE).expect("for the default resource");
}

/// A static HTTPS server (Python's http.server with the provider's test
/// certificate) for `root`, on `port`; it dies with the test process.
struct StaticServer(u32);

impl Drop for StaticServer {
    fn drop(&mut self) {
        fhir_operator_e2e::control_plane::stop_owned("http.server", self.0);
    }
}

fn serve_static(root: &std::path::Path, port: u16, idp: &Idp) -> StaticServer {
    let script = r#"
import functools, http.server, ssl, sys
root, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;
    let mut command = Command::new("python3");
    command
        .args(["-c", script])
        .arg(root)
        .arg(port.to_string())
        .arg(&idp.certificate().cert)
        .arg(&idp.certificate().key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid =
        fhir_operator_e2e::control_plane::spawn_owned("http.server", command).expect("python3 for a static server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the static server did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    StaticServer(pid)
}

#[test]
fn fhirclient_gets_a_backend_services_token_through_smart_discovery() {
    let port = fhir_operator_e2e::postgres::free_port().unwrap();
    let base = format!("https://127.0.0.1:{port}/fhir");
    let idp = Idp::start(IdpOptions { default_resource: Some(base.clone()), ..IdpOptions::default() })
        .expect("the OpenID provider");
    // The SMART configuration a FHIR server publishes at its base (SMART App
    // Launch 2, backend services), naming this provider.
    let discovery = idp.discovery();
    let smart_configuration = json!({
        "issuer": idp.issuer(),
        "jwks_uri": idp.jwks_uri(),
        "token_endpoint": idp.token_endpoint(),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": discovery["scopes_supported"],
        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        "code_challenge_methods_supported": ["S256"],
    });
    let root = tempfile::tempdir().unwrap();
    let well_known = root.path().join("fhir/.well-known");
    std::fs::create_dir_all(&well_known).unwrap();
    std::fs::write(well_known.join("smart-configuration"), smart_configuration.to_string()).unwrap();
    let _server = serve_static(root.path(), port, &idp);

    let fhirclient = |client: &str, scopes: &[&str]| {
        let key = idp.client_key_file(client).unwrap();
        fhirclient_backend_services(&base, None, client, key, scopes, idp.ca_file(), SmartSteps::Token)
    };
    for client in [BILLING_EXPORT, CLINICAL_PORTAL] {
        let result = fhirclient(client, &["system/Patient.rs"]).unwrap_or_else(|e| panic!("{e:#}\n{}", idp.log()));
        eprintln!("fhirclient as {client}: {result}");
        assert_eq!(result["token_endpoint"], idp.token_endpoint());
        assert_eq!(result["scope"], "system/Patient.rs");
        assert_eq!(result["aud"], base);
        assert_eq!(result["client_id"], client);
        assert!(result["jti"].as_str().is_some_and(|j| !j.is_empty()), "{result}");
        assert!(kids(&idp.jwks().unwrap()).contains(&result["kid"].as_str().unwrap().to_owned()), "{result}");
        let requests = result["requests"].as_array().unwrap();
        assert!(
            requests.iter().any(|r| r["url"] == idp.token_endpoint() && r["status"] == 200),
            "fhirclient's own token request: {result}"
        );
        assert!(!result.to_string().contains("access_token"), "{result}");
    }

    // fhirclient cannot get a scope the client is not allowed.
    let refused = fhirclient(CLINICAL_PORTAL, &["system/*.cruds"]).unwrap_err();
    assert!(format!("{refused:#}").contains("400"), "{refused:#}");
}

/// The search and read of [`fhirclient_backend_services`] against the real
/// FHIR server (hfs 0.2.7 on SQLite, plain HTTP on loopback), with the
/// token endpoint found in the provider's own discovery document. hfs does
/// not check tokens (the gateway does, in its own tests): this shows that
/// fhirclient gets its token, sends it as a bearer token, searches and
/// reads.
#[test]
fn fhirclient_searches_and_reads_the_fhir_server_with_a_backend_services_token() {
    let binary = fhir_operator_e2e::hfs::binary().unwrap_or_else(|e| panic!("{e:#}"));
    let data = fhir_operator_e2e::hfs::search_parameters_dir().unwrap().join("data");
    let port = fhir_operator_e2e::postgres::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let idp = Idp::start(IdpOptions { default_resource: Some(base.clone()), ..IdpOptions::default() })
        .expect("the OpenID provider");
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(binary);
    command
        .env("HFS_SERVER_HOST", "127.0.0.1")
        .env("HFS_SERVER_PORT", port.to_string())
        .env("HFS_BASE_URL", &base)
        .env("HFS_STORAGE_BACKEND", "sqlite")
        .env("HFS_DATABASE_URL", dir.path().join("fhir.db"))
        .env("HFS_DATA_DIR", &data)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pid = fhir_operator_e2e::control_plane::spawn_owned("hfs", command).expect("hfs");
    let _hfs = scopeguard(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "hfs did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let created = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--header", "Content-Type: application/fhir+json"])
        .args(["--data-binary", r#"{"resourceType":"Patient","name":[{"family":"Backend","given":["Smart"]}]}"#])
        .arg(format!("{base}/Patient"))
        .output()
        .unwrap();
    let created: Value = serde_json::from_slice(&created.stdout).expect("hfs created a Patient");
    let id = created["id"].as_str().expect("the Patient's id");

    let discovery = format!("{}/.well-known/openid-configuration", idp.issuer());
    let key = idp.client_key_file(BILLING_EXPORT).unwrap();
    let result = fhirclient_backend_services(
        &base,
        Some(&discovery),
        BILLING_EXPORT,
        key,
        &["system/Patient.rs"],
        idp.ca_file(),
        SmartSteps::SearchAndRead,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", idp.log()));
    eprintln!("fhirclient against hfs: {result}");
    assert_eq!(result["aud"], base);
    assert_eq!(result["search"]["status"], 200, "{result}");
    assert_eq!(result["search"]["resource_type"], "Bundle");
    assert_eq!(result["search"]["resource_types"], json!(["Patient"]));
    assert!(result["search"]["url"].as_str().unwrap().ends_with("/Patient?_count=1"), "{result}");
    assert_eq!(result["read"]["status"], 200, "{result}");
    assert_eq!(result["read"]["resource_type"], "Patient");
    assert_eq!(result["read"]["id"], id);
    let requests = result["requests"].as_array().unwrap();
    let fhir: Vec<_> = requests.iter().filter(|r| r["url"].as_str().unwrap().starts_with(&base)).collect();
    assert_eq!(fhir.len(), 2, "{result}");
    assert!(fhir.iter().all(|r| r["method"] == "GET" && r["bearer"] == true), "{result}");
}

/// Stops an owned hfs at the end of the test.
fn scopeguard(pid: u32) -> impl Drop {
    struct Stop(u32);
    impl Drop for Stop {
        fn drop(&mut self) {
            fhir_operator_e2e::control_plane::stop_owned("hfs", self.0);
        }
    }
    Stop(pid)
}
