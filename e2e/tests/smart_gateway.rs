//! SMART on FHIR and least privilege at the gateway, against the real
//! things, on loopback:
//! - a real OpenID provider (oidc-provider, `e2e/src/idp.rs`) issuing JWT
//!   access tokens to `private_key_jwt` clients;
//! - the real operator against a real kube-apiserver: it fetches the
//!   provider's JWKS (the pods never reach out), issues the API keys, and
//!   renders the gateway's ConfigMap;
//! - that ConfigMap run as the pod would: real nginx and the real
//!   `fhir-operator gateway-auth` on the files the kubelet would mount, in
//!   front of the real FHIR server (hfs 0.2.7);
//! - a real SMART client (PyPI fhirclient, backend services) discovering the
//!   token endpoint from the gateway's `.well-known/smart-configuration`.
//!
//! Checked: the scope matrix for an API-key client and an OAuth client
//! (exact status codes), every kind of bad token, an IdP key rotation picked
//! up by the operator's refresh, the `accessControl` compliance entry, and a
//! canary: no token or key value in any log, event, status or metric.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fhir_operator::api::{FhirEndpoint, KeyRotationSchedule};
use fhir_operator::fhirendpoint::auth::{AUTH_CONFIG_KEY, SMART_CONFIGURATION_KEY};
use fhir_operator::fhirendpoint::build::{DEFAULT_LIMITS, NGINX_CONF_KEY, gateway_config_name};
use fhir_operator::fhirendpoint::gateway::{self, GatewayAuth, GatewaySettings};
use fhir_operator::fhirendpoint::{pod, validate};
use fhir_operator::keyrotation::keys::GATEWAY_MAP_ENTRY;
use fhir_operator_e2e::control_plane::OwnedProcess;
use fhir_operator_e2e::fhir_client::{Client, Response, patient};
use fhir_operator_e2e::idp::{
    BILLING_EXPORT, CLINICAL_PORTAL, ClientOptions, Idp, IdpOptions, SmartSteps, fhirclient_backend_services,
};
use fhir_operator_e2e::operator::{self, Operator, grant_rbac};
use fhir_operator_e2e::postgres::free_port;
use fhir_operator_e2e::{apply_value, cluster, install_crds, namespace, wait_for};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
/// An API-key client that only reads patients, and one that may do
/// everything (batch, operations).
const READER: &str = "partner-reader";
const ADMIN: &str = "partner-admin";

fn tool(name: &str, package: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not installed and this test needs the real one: apt-get install {package}")
        })
}

/// The endpoint: helios on loopback, API keys from one schedule, tokens
/// from the provider (keys fetched from its `jwks_uri`) and from a second,
/// test-held issuer whose keys come from a ConfigMap; every client scoped.
fn endpoint(public_url: &str, idp: &Idp, admin: bool) -> Value {
    let mut clients = vec![
        json!({"id": READER, "scopes": ["system/Patient.rs"]}),
        json!({"id": BILLING_EXPORT, "scopes": ["system/Patient.rs", "system/Coverage.rs"]}),
        json!({"id": CLINICAL_PORTAL, "scopes": ["system/Patient.cruds", "system/Observation.cruds"]}),
    ];
    if admin {
        clients.push(json!({"id": ADMIN, "scopes": ["system/*.cruds"]}));
    }
    json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": "patients"},
        "spec": {
            "publicUrl": public_url,
            "server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7"},
            "auth": {
                "apiKeys": ["partners"],
                "oauth": {
                    "issuers": [
                        {"issuer": idp.issuer(), "audiences": [public_url],
                         "jwks": {"uri": idp.jwks_uri(), "refreshInterval": "1h"},
                         "algorithms": ["RS256", "ES256"]},
                        {"issuer": TEST_ISSUER, "audiences": [public_url],
                         "jwks": {"configMap": {"name": "test-issuer-jwks", "key": "jwks.json"}},
                         "algorithms": ["ES256"]},
                    ],
                    "smartConfiguration": {
                        "tokenEndpoint": idp.token_endpoint(),
                        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
                    },
                },
                "clients": clients,
            },
        }
    })
}

const TEST_ISSUER: &str = "https://issuer.test.example";

/// A key the test holds, published for [`TEST_ISSUER`] in a ConfigMap.
struct TestIssuer {
    key: EncodingKey,
    jwk: jsonwebtoken::jwk::Jwk,
}

impl TestIssuer {
    fn new() -> TestIssuer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some("test-1".into());
        TestIssuer { key, jwk }
    }

    fn token(&self, public_url: &str, edit: impl FnOnce(&mut Value)) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let mut claims = json!({"iss": TEST_ISSUER, "aud": public_url, "iat": now, "exp": now + 300,
            "jti": "test-jti", "client_id": BILLING_EXPORT, "scope": "system/Patient.rs"});
        edit(&mut claims);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("test-1".into());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

struct Gateway {
    client: Client,
}

impl Gateway {
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> Response {
        self.client.request(method, path, headers, body)
    }

    fn bearer(&self, token: &str, method: &str, path: &str, body: Option<&Value>) -> Response {
        let auth = format!("Bearer {token}");
        let ct = if method == "PATCH" { "application/json-patch+json" } else { "application/fhir+json" };
        self.call(method, path, &[("Authorization", &auth), ("Content-Type", ct)], body)
    }

    fn keyed(&self, key: &str, method: &str, path: &str, body: Option<&Value>) -> Response {
        let ct = if method == "PATCH" { "application/json-patch+json" } else { "application/fhir+json" };
        self.call(method, path, &[("X-API-Key", key), ("Content-Type", ct)], body)
    }
}

/// One row of the scope matrix.
struct Case {
    what: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
}

fn cases(id: &str) -> Vec<Case> {
    let case = |what, method, path: String, body: Option<Value>| Case { what, method, path, body };
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("Patient/{id}")}}]});
    let mut updated = patient("Updated");
    updated["id"] = json!(id);
    vec![
        case("read", "GET", format!("/Patient/{id}"), None),
        case("vread", "GET", format!("/Patient/{id}/_history/1"), None),
        case("search GET", "GET", "/Patient?_count=1".into(), None),
        case("search POST", "POST", "/Patient/_search".into(), None),
        case("create", "POST", "/Patient".into(), Some(patient("Created"))),
        case("update", "PUT", format!("/Patient/{id}"), Some(updated)),
        case(
            "patch",
            "PATCH",
            format!("/Patient/{id}"),
            Some(json!([{"op": "replace", "path": "/active", "value": true}])),
        ),
        case("history", "GET", format!("/Patient/{id}/_history"), None),
        case("$operation", "GET", format!("/Patient/{id}/$everything"), None),
        case("batch", "POST", "/".into(), Some(bundle)),
        case("other type read", "GET", "/Observation/1".into(), None),
        case("include of another type", "GET", "/Patient?_revinclude=Observation:subject".into(), None),
        case("delete", "DELETE", format!("/Patient/{id}"), None),
    ]
}

async fn config_map(client: &kube::Client, ns: &str) -> BTreeMap<String, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    api.get(&gateway_config_name("patients")).await.expect("gateway ConfigMap").data.unwrap_or_default()
}

fn kids(jwks: &Value) -> Vec<String> {
    let mut kids: Vec<String> =
        jwks["keys"].as_array().into_iter().flatten().filter_map(|k| k["kid"].as_str().map(str::to_owned)).collect();
    kids.sort();
    kids
}

#[tokio::test(flavor = "multi_thread")]
async fn smart_tokens_and_scoped_api_keys_are_enforced_by_the_rendered_gateway() {
    let (nginx, curl) = (tool("nginx", "nginx"), tool("curl", "curl"));
    let hfs = fhir_operator_e2e::hfs::binary().unwrap_or_else(|e| panic!("{e:#}")).to_owned();
    let hfs_data = fhir_operator_e2e::hfs::search_parameters_dir().unwrap_or_else(|e| panic!("{e:#}")).join("data");
    let dir = tempfile::Builder::new().prefix("fhir-smart-").tempdir().expect("temp dir");
    let (gateway_port, server_port, auth_port) =
        (free_port().expect("port"), free_port().expect("port"), free_port().expect("port"));
    let public_url = format!("https://localhost:{gateway_port}");

    // -- The identity provider: its clients may ask for broad scopes; the
    // endpoint's client list bounds them.
    let idp = Idp::start(IdpOptions {
        clients: vec![
            ClientOptions::new(BILLING_EXPORT, &["system/Patient.rs", "system/Coverage.rs", "system/*.cruds"]),
            ClientOptions::new(CLINICAL_PORTAL, &["system/Patient.cruds", "system/Observation.cruds"]),
        ],
        default_resource: Some(public_url.clone()),
        ..IdpOptions::default()
    })
    .unwrap_or_else(|e| panic!("the OpenID provider: {e:#}"));
    let test_issuer = TestIssuer::new();

    // -- The operator, trusting the provider's CA for its JWKS URL.
    let cluster = cluster();
    let kube = cluster.client().await;
    install_crds(&kube).await.expect("CRDs");
    grant_rbac(&kube).await.expect("RBAC");
    let ns = namespace(&kube, "smart").await.expect("namespace");
    // Keys refresh hourly on schedule: a rotation within the test reaches the
    // gateway only through the verifier's hint.
    let ca_arg = format!("--jwks-ca-file={}", idp.ca_file().display());
    let hints_port = free_port().expect("port");
    let hints_args = [
        ca_arg.clone(),
        format!("--key-hints-addr=127.0.0.1:{hints_port}"),
        format!("--key-hints-url=http://127.0.0.1:{hints_port}/v1/key-hints"),
    ];
    let hints_args: Vec<&str> = hints_args.iter().map(String::as_str).collect();
    let mut operator = Operator::start(cluster.operator_kubeconfig(), &hints_args).expect("operator");
    let jwks_doc = json!({"keys": [serde_json::to_value(&test_issuer.jwk).expect("jwk")]});
    apply_value(
        &kube,
        &ns,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "test-issuer-jwks"}, "data": {"jwks.json": jwks_doc.to_string()}}),
    )
    .await;
    apply_value(
        &kube,
        &ns,
        &json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
        "metadata": {"name": "partners"},
        "spec": {"algorithm": "api-key", "clients": [READER, ADMIN], "interval": "30d"}}),
    )
    .await;
    apply_value(&kube, &ns, &endpoint(&public_url, &idp, true)).await;

    // The provider's keys reach the rendered configuration and the status.
    let idp_kids = kids(&idp.jwks().expect("jwks"));
    let endpoints: Api<FhirEndpoint> = Api::namespaced(kube.clone(), &ns);
    let ep = wait_for("the issuers' keys in status", WAIT, || {
        let endpoints = endpoints.clone();
        let idp_kids = idp_kids.clone();
        async move {
            let ep = endpoints.get("patients").await?;
            let issuers = ep.status.as_ref().map(|s| s.token_issuers.clone()).unwrap_or_default();
            let ok = issuers.len() == 2 && issuers[0].key_ids == idp_kids && issuers[1].key_ids == ["test-1"];
            Ok(ok.then_some(ep))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.logs()));
    let status = ep.status.clone().expect("status");
    assert!(status.token_issuers[0].fetched_at.is_some(), "{:?}", status.token_issuers);
    assert!(status.token_issuers.iter().all(|i| i.error.is_empty()), "{:?}", status.token_issuers);
    let access = status.compliance.iter().find(|c| c.reason == "WildcardWriteScope");
    assert!(
        access.is_some_and(|a| a.message.contains(ADMIN)),
        "a wildcard writer fails accessControl: {:?}",
        status.compliance
    );

    // -- What the pod would mount: the ConfigMap's files, the key map from
    // the schedule's Secret, a certificate (the provider's test CA's).
    let data = config_map(&kube, &ns).await;
    let auth_json: Value = serde_json::from_str(&data[AUTH_CONFIG_KEY]).expect("auth.json");
    assert_eq!(kids(&auth_json["issuers"][0]["jwks"]), idp_kids, "the fetched keys are in auth.json");
    let schedules: Api<KeyRotationSchedule> = Api::namespaced(kube.clone(), &ns);
    let krs = schedules.get("partners").await.expect("schedule");
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let secret_name = fhir_operator::keyrotation::secret::secret_name(&krs);
    let secret = wait_for("the API keys", WAIT, || {
        let secrets = secrets.clone();
        let secret_name = secret_name.clone();
        async move {
            Ok(secrets
                .get_opt(&secret_name)
                .await?
                .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key(GATEWAY_MAP_ENTRY))))
        }
    })
    .await
    .expect("key Secret");
    let secret_data = secret.data.clone().unwrap_or_default();
    let key_of = |client: &str| {
        String::from_utf8(secret_data[&format!("current.client.{client}")].0.clone()).expect("UTF-8 key")
    };
    let (reader_key, admin_key) = (key_of(READER), key_of(ADMIN));

    let gw = dir.path().join("gateway");
    for sub in ["keys/partners", "run", "conf"] {
        std::fs::create_dir_all(gw.join(sub)).expect("dir");
    }
    std::fs::write(gw.join("keys/partners").join(GATEWAY_MAP_ENTRY), &secret_data[GATEWAY_MAP_ENTRY].0).expect("map");
    let cert = idp.certificate();
    let auth_file = gw.join("conf").join(AUTH_CONFIG_KEY);
    std::fs::write(&auth_file, &data[AUTH_CONFIG_KEY]).expect("auth.json");
    let smart_file = gw.join("conf").join(SMART_CONFIGURATION_KEY);
    std::fs::write(&smart_file, &data[SMART_CONFIGURATION_KEY]).expect("smart configuration");
    // The settings the ConfigMap's nginx.conf was rendered from, checked by
    // rendering them again; the loopback copy differs only in paths and ports.
    let v = validate::validate(&ep).expect("valid");
    let in_pod = GatewaySettings {
        public_host: v.public_host.clone(),
        public_port: v.public_port,
        auth: pod::gateway_auth(&v),
        ..pod::gateway_settings(DEFAULT_LIMITS)
    };
    assert_eq!(gateway::nginx_conf(&in_pod).expect("renders"), data[NGINX_CONF_KEY], "the ConfigMap's nginx.conf");
    let path = |p: &Path| p.to_str().expect("UTF-8").to_owned();
    let settings = GatewaySettings {
        listen: format!("127.0.0.1:{gateway_port}"),
        upstream: format!("127.0.0.1:{server_port}"),
        tls_certificate: path(&cert.cert),
        tls_certificate_key: path(&cert.key),
        api_keys_map: path(&gw.join("keys/*/api-keys.map")),
        temp_dir: path(&gw.join("run")),
        access_log: path(&gw.join("access.log")),
        auth: Some(GatewayAuth {
            verifier: format!("127.0.0.1:{auth_port}"),
            smart_configuration: Some(path(&smart_file)),
            ..in_pod.auth.clone().expect("auth")
        }),
        ..in_pod.clone()
    };
    let conf = gw.join("nginx.conf");
    std::fs::write(&conf, gateway::nginx_conf(&settings).expect("renders")).expect("nginx.conf");

    // -- hfs, the verifier and nginx.
    let work = dir.path().join("hfs");
    std::fs::create_dir_all(&work).expect("hfs dir");
    let mut command = Command::new(&hfs);
    command
        .env_clear()
        .env("HFS_SERVER_HOST", "127.0.0.1")
        .env("HFS_SERVER_PORT", server_port.to_string())
        .env("HFS_BASE_URL", &public_url)
        .env("HFS_STORAGE_BACKEND", "sqlite")
        .env("HFS_DATABASE_URL", work.join("fhir.db"))
        .env("HFS_DATA_DIR", &hfs_data)
        .current_dir(&work);
    let server = OwnedProcess::start("hfs", command, dir.path().join("hfs.log"));
    let mut command = Command::new(operator::binary());
    command.args(["gateway-auth", "--config"]).arg(&auth_file).args([
        "--listen",
        &format!("127.0.0.1:{auth_port}"),
        "--reload-interval",
        "200ms",
    ]);
    let verifier = OwnedProcess::start("fhir-operator", command, dir.path().join("gateway-auth.log"));
    let mut command = Command::new(&nginx);
    command.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
    let proxy = OwnedProcess::start("nginx", command, dir.path().join("nginx.log"));
    server.await_port(server_port);
    verifier.await_port(auth_port);
    proxy.await_port(gateway_port);

    let g = Gateway {
        client: Client {
            curl,
            ca: cert.ca.clone(),
            public_url: public_url.clone(),
            api_key: admin_key.clone(),
            dir: dir.path().into(),
        },
    };
    // hfs answers once its storage is ready.
    let started = Instant::now();
    let id = loop {
        let r = g.keyed(&admin_key, "POST", "/Patient", Some(&patient("Seed")));
        if r.status == 201 {
            break r.json()["id"].as_str().expect("id").to_owned();
        }
        assert!(started.elapsed() < WAIT, "hfs behind the gateway: {} {}\n{}", r.status, r.body, server.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tokens: Vec<String> = Vec::new();

    // -- SMART discovery: public.
    let r = g.call("GET", "/.well-known/smart-configuration", &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["token_endpoint"], idp.token_endpoint());

    // -- The scope matrix. Expected: what hfs answers when allowed (the
    // admin's column, asserted exactly), 403 when the scopes do not allow.
    let billing = idp.token(BILLING_EXPORT, &["system/Patient.rs", "system/*.cruds"], &public_url).expect("token");
    let portal =
        idp.token(CLINICAL_PORTAL, &["system/Patient.cruds", "system/Observation.cruds"], &public_url).expect("token");
    tokens.extend([billing.clone(), portal.clone()]);
    let reads = ["read", "vread", "search GET", "history"];
    let portal_allowed = [
        "read",
        "vread",
        "search GET",
        "history",
        "create",
        "update",
        "patch",
        "other type read",
        "include of another type",
        "delete",
    ];
    let mut table = Vec::new();
    for case in cases(&id) {
        let as_admin = g.keyed(&admin_key, case.method, &case.path, case.body.as_ref());
        let as_reader = g.keyed(&reader_key, case.method, &case.path, case.body.as_ref());
        let as_billing = g.bearer(&billing, case.method, &case.path, case.body.as_ref());
        let as_portal = g.bearer(&portal, case.method, &case.path, case.body.as_ref());
        table.push(format!(
            "{:<24} admin {} reader {} billing {} portal {}",
            case.what, as_admin.status, as_reader.status, as_billing.status, as_portal.status
        ));
        assert!(
            ![401, 403].contains(&as_admin.status),
            "{}: the wildcard client is allowed: {}",
            case.what,
            as_admin.body
        );
        let read_only = reads.contains(&case.what);
        for (who, r) in [("reader key", &as_reader), ("billing token", &as_billing)] {
            if read_only {
                assert_eq!(r.status, as_admin.status, "{} as {who}: {}", case.what, r.body);
            } else {
                assert_eq!(r.status, 403, "{} as {who}: {}", case.what, r.body);
                assert!(r.body.contains("OperationOutcome") && r.body.contains("\"forbidden\""), "{}", r.body);
                let challenge = r.header("WWW-Authenticate").unwrap_or_default();
                assert!(challenge.contains("insufficient_scope"), "{who} {}: {challenge}", case.what);
            }
        }
        if portal_allowed.contains(&case.what) {
            assert!(![401, 403].contains(&as_portal.status), "{} as portal: {}", case.what, as_portal.body);
        } else {
            assert_eq!(as_portal.status, 403, "{} as portal: {}", case.what, as_portal.body);
        }
    }
    eprintln!("scope matrix (status per client):\n{}", table.join("\n"));
    // 403s do not tell whether a resource exists.
    let missing = g.keyed(&reader_key, "DELETE", "/Patient/does-not-exist", None);
    let present = g.keyed(&reader_key, "DELETE", &format!("/Patient/{id}"), None);
    assert_eq!((missing.status, missing.body.clone()), (present.status, present.body.clone()));

    // -- Tokens refused, each 401 invalid_token with an OperationOutcome.
    let other_aud = idp.token(BILLING_EXPORT, &["system/Patient.rs"], "https://other.example/fhir").expect("token");
    let mut parts: Vec<String> = billing.split('.').map(str::to_owned).collect();
    let mut payload = parts[1].clone();
    let last = payload.pop().expect("payload");
    payload.push(if last == 'A' { 'B' } else { 'A' });
    parts[1] = payload;
    let tampered = parts.join(".");
    use base64ct::Encoding;
    let b64 = |v: Value| base64ct::Base64UrlUnpadded::encode_string(v.to_string().as_bytes());
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(&billing).expect("claims");
    let none = format!("{}.{}.", b64(json!({"alg": "none", "typ": "JWT"})), b64(claims.clone()));
    let idp_jwk = idp.jwks().expect("jwks")["keys"][0].to_string();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = jsonwebtoken::decode_header(&billing).expect("header").kid;
    let hs256 =
        jsonwebtoken::encode(&hs_header, &claims, &EncodingKey::from_secret(idp_jwk.as_bytes()).expect("hmac key"))
            .expect("sign");
    let now = jsonwebtoken::get_current_timestamp();
    let expired = test_issuer.token(&public_url, |c| c["exp"] = json!(now - 120));
    let not_yet = test_issuer.token(&public_url, |c| c["nbf"] = json!(now + 600));
    let wrong_issuer = test_issuer.token(&public_url, |c| c["iss"] = json!("https://unknown.example"));
    let good_test = test_issuer.token(&public_url, |_| {});
    tokens.extend([other_aud.clone(), tampered.clone(), none.clone(), hs256.clone()]);
    tokens.extend([expired.clone(), not_yet.clone(), wrong_issuer.clone(), good_test.clone()]);
    // The matrix deleted the seed: a fresh patient for what follows.
    let r = g.keyed(&admin_key, "POST", "/Patient", Some(&patient("Second")));
    assert_eq!(r.status, 201, "{}", r.body);
    let patient_path = format!("/Patient/{}", r.json()["id"].as_str().expect("id"));
    assert_eq!(g.bearer(&good_test, "GET", &patient_path, None).status, 200, "the ConfigMap issuer's own token");
    for (what, token, reason) in [
        ("expired", &expired, "expired"),
        ("not yet valid", &not_yet, "not valid yet"),
        ("wrong issuer", &wrong_issuer, "issuer"),
        ("wrong audience", &other_aud, "aud"),
        ("tampered signature", &tampered, ""),
        ("alg none", &none, ""),
        ("HS256 keyed with the public key", &hs256, ""),
    ] {
        let r = g.bearer(token, "GET", &patient_path, None);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        let challenge = r.header("WWW-Authenticate").unwrap_or_default();
        assert!(challenge.contains("error=\"invalid_token\""), "{what}: {challenge}");
        assert!(r.json()["resourceType"] == "OperationOutcome" && r.body.contains(reason), "{what}: {}", r.body);
    }
    // No credentials at all.
    let r = g.call("GET", &patient_path, &[], None);
    assert_eq!(r.status, 401);
    assert!(r.header("WWW-Authenticate").is_some_and(|c| c.contains("Bearer") && !c.contains("error=")));
    // A token of one client with the API key of another.
    let auth = format!("Bearer {billing}");
    let r = g.call("GET", &patient_path, &[("Authorization", &auth), ("X-API-Key", &reader_key)], None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("different clients"), "{}", r.body);

    // -- A real SMART client: discovery at the gateway, token from the
    // provider, search and read through the gateway.
    let key = idp.client_key_file(BILLING_EXPORT).expect("key").to_owned();
    let smart = fhirclient_backend_services(
        &public_url,
        None,
        BILLING_EXPORT,
        &key,
        &["system/Patient.rs"],
        &cert.ca,
        SmartSteps::SearchAndRead,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", idp.log()));
    eprintln!("fhirclient through the gateway: {smart}");
    assert_eq!(smart["search"]["status"], 200, "{smart}");
    assert_eq!(smart["read"]["status"], 200, "{smart}");
    assert_eq!(smart["aud"], public_url.as_str());

    // -- The provider rotates its signing key. Keys refresh hourly: the
    // verifier's hint has the operator fetch them at once, and the new key
    // reaches the ConfigMap (the kubelet's copy is the test's).
    let publish = |kid: String, within: Duration| {
        let (kube, ns) = (kube.clone(), ns.clone());
        wait_for("the new key in the gateway's ConfigMap", within, move || {
            let (kube, ns, kid) = (kube.clone(), ns.clone(), kid.clone());
            async move {
                let data = config_map(&kube, &ns).await;
                Ok(data.get(AUTH_CONFIG_KEY).is_some_and(|a| a.contains(&kid)).then_some(data))
            }
        })
    };
    let accepted = |token: String| {
        let (g, patient_path) = (&g, &patient_path);
        wait_for("the verifier to reload", Duration::from_secs(10), move || {
            let r = g.bearer(&token, "GET", patient_path, None);
            async move { Ok((r.status == 200).then_some(())) }
        })
    };
    let new_kid = idp.rotate_signing_key().expect("rotation");
    let rotated = idp.token(BILLING_EXPORT, &["system/Patient.rs"], &public_url).expect("token");
    tokens.push(rotated.clone());
    let r = g.bearer(&rotated, "GET", &patient_path, None);
    assert_eq!(r.status, 401, "an unknown kid: {}", r.body);
    assert!(r.body.contains("not published"), "{}", r.body);
    let rotation = Instant::now();
    let data = publish(new_kid.clone(), Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", operator.logs(), verifier.log()));
    eprintln!("the operator published the rotated key {:?} after the first refused token", rotation.elapsed());
    std::fs::write(&auth_file, &data[AUTH_CONFIG_KEY]).expect("auth.json");
    accepted(rotated.clone()).await.unwrap_or_else(|e| panic!("{e}\n{}", verifier.log()));
    let ep = endpoints.get("patients").await.expect("endpoint");
    assert!(ep.status.expect("status").token_issuers[0].key_ids.contains(&new_kid));
    let logs = operator.logs();
    assert!(
        logs.lines().any(|l| l.contains("keys on a hint") && l.contains(&new_kid)),
        "the operator fetched on the verifier's hint:\n{logs}"
    );

    // -- Fault: the operator is killed, and the provider rotates again
    // meanwhile. The verifier's hints reach nobody; the keys in force stay;
    // once the operator is back, the new key is published and accepted.
    operator.kill9();
    let first_operator_logs = operator.logs();
    let second_kid = idp.rotate_signing_key().expect("rotation");
    let second = idp.token(BILLING_EXPORT, &["system/Patient.rs"], &public_url).expect("token");
    tokens.push(second.clone());
    assert_eq!(g.bearer(&second, "GET", &patient_path, None).status, 401);
    assert_eq!(g.bearer(&rotated, "GET", &patient_path, None).status, 200, "the keys in force stay");
    // The client retries; the verifier hints again once its interval passed.
    wait_for("the verifier to miss the operator", Duration::from_secs(30), || {
        let status = g.bearer(&second, "GET", &patient_path, None).status;
        assert_eq!(status, 401, "a token of an unpublished key");
        let log = verifier.log();
        async move { Ok(log.contains("cannot reach the operator with a key hint").then_some(())) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", verifier.log()));
    operator = Operator::start(cluster.operator_kubeconfig(), &hints_args).expect("operator again");
    let restart = Instant::now();
    let data = publish(second_kid.clone(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", operator.logs(), verifier.log()));
    eprintln!("after the operator's restart, the second key was published in {:?}", restart.elapsed());
    std::fs::write(&auth_file, &data[AUTH_CONFIG_KEY]).expect("auth.json");
    accepted(second.clone()).await.unwrap_or_else(|e| panic!("{e}\n{}", verifier.log()));

    // -- accessControl passes once no client may write everything.
    apply_value(&kube, &ns, &endpoint(&public_url, &idp, false)).await;
    let ep = wait_for("accessControl Pass", WAIT, || {
        let endpoints = endpoints.clone();
        async move {
            let ep = endpoints.get("patients").await?;
            let pass = ep.status.as_ref().is_some_and(|s| {
                s.compliance
                    .iter()
                    .any(|c| c.reason == "ClientsScoped" && c.status == fhir_operator::api::ComplianceStatus::Pass)
            });
            Ok(pass.then_some(ep))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let entry = ep.status.as_ref().expect("status").compliance.iter().find(|c| c.reason == "ClientsScoped").cloned();
    eprintln!("accessControl: {entry:?}");
    assert!(entry.expect("entry").evidence.iter().any(|e| e == &format!("client {READER}: system/Patient.rs")));

    // -- Canary: no token or key value anywhere but the request.
    drop(proxy);
    drop(verifier);
    let mut places = vec![
        ("nginx access log", std::fs::read_to_string(gw.join("access.log")).unwrap_or_default()),
        ("nginx error log", std::fs::read_to_string(dir.path().join("nginx.log")).unwrap_or_default()),
        ("gateway-auth output", std::fs::read_to_string(dir.path().join("gateway-auth.log")).unwrap_or_default()),
        ("operator logs", format!("{first_operator_logs}{}", operator.logs())),
        ("operator metrics", operator.metrics()),
        ("endpoint status", serde_json::to_string(&ep.status).unwrap_or_default()),
    ];
    let events: Api<Event> = Api::namespaced(kube.clone(), &ns);
    let events = events.list(&ListParams::default()).await.expect("events");
    places.push(("events", serde_json::to_string(&events.items).unwrap_or_default()));
    let access = &places[0].1;
    assert!(access.contains(&format!("\"client\":\"{BILLING_EXPORT}\"")), "the access log names token clients");
    assert!(
        access.lines().any(|l| l.contains(BILLING_EXPORT) && l.contains("\"jti\":\"") && !l.contains("\"jti\":\"\"")),
        "the access log holds the tokens' jti"
    );
    let secrets: Vec<&str> =
        tokens.iter().map(String::as_str).chain([reader_key.as_str(), admin_key.as_str()]).collect();
    for (place, text) in &places {
        for secret in &secrets {
            // A JWT's signature is its secret part; its header alone is public.
            let needle = secret.rsplit('.').next().filter(|s| s.len() >= 16).unwrap_or(secret);
            assert!(!text.contains(needle), "a token or key value is in the {place}");
        }
    }
    drop(server);
}
