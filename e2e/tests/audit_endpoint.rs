//! `spec.audit` end to end, on loopback: the real operator against a real
//! kube-apiserver makes the endpoint's signing key and renders the audit
//! sidecar; that rendering runs as the pod would (real nginx writing its
//! log to a file, the real `fhir-operator audit-sidecar` following it with
//! the arguments from the Deployment) into a real S3 server (s3s-fs); the
//! operator's own periodic verification then turns `auditLog` to Pass with
//! the record count, and to Fail, naming the segment and record, once one
//! byte of the trail is changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fhir_operator::api::{ComplianceStatus, FhirEndpoint};
use fhir_operator::fhirendpoint::audit::{AUDIT_CONTAINER, PUBLIC_KEY_CONFIG_KEY, signing_key_secret};
use fhir_operator::fhirendpoint::build::{DEFAULT_LIMITS, NGINX_CONF_KEY, audited, gateway_config_name};
use fhir_operator::fhirendpoint::gateway::{self, GatewaySettings};
use fhir_operator::fhirendpoint::{pod, validate};
use fhir_operator::keyrotation::keys::GATEWAY_MAP_ENTRY;
use fhir_operator_e2e::control_plane::OwnedProcess;
use fhir_operator_e2e::fhir_client::{Client, issue_certificate};
use fhir_operator_e2e::operator::{self, Operator, grant_rbac};
use fhir_operator_e2e::postgres::free_port;
use fhir_operator_e2e::s3::S3Server;
use fhir_operator_e2e::{apply_value, audit_log_entry, cluster, install_crds, namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);
const BUCKET: &str = "fhir-audit";
const PREFIX: &str = "prod/patients";

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_verifies_the_trail_its_sidecar_writes_and_catches_tampering() {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("nginx is needed: apt-get install nginx");
    let s3 = S3Server::start(BUCKET).unwrap_or_else(|e| panic!("the S3 server: {e:#}"));
    let dir = tempfile::Builder::new().prefix("fhir-audit-ep-").tempdir().expect("temp dir");
    let d = dir.path();
    let (gateway_port, upstream_port, metrics_port) =
        (free_port().expect("port"), free_port().expect("port"), free_port().expect("port"));
    let public_url = format!("https://localhost:{gateway_port}");

    let cluster = cluster();
    let kube = cluster.client().await;
    install_crds(&kube).await.expect("CRDs");
    grant_rbac(&kube).await.expect("RBAC");
    let ns = namespace(&kube, "audit").await.expect("namespace");
    let operator = Operator::start(cluster.operator_kubeconfig(), &[]).expect("operator");
    apply_value(
        &kube,
        &ns,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "audit-s3"},
        "stringData": {"accessKeyId": s3.access_key(), "secretAccessKey": s3.secret_key()}}),
    )
    .await;
    apply_value(
        &kube,
        &ns,
        &json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
        "metadata": {"name": "partners"},
        "spec": {"algorithm": "api-key", "clients": ["reader"], "interval": "30d"}}),
    )
    .await;
    apply_value(
        &kube,
        &ns,
        &json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": "patients"},
            "spec": {
                "publicUrl": public_url,
                "server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7"},
                "auth": {"apiKeys": ["partners"]},
                "audit": {
                    "destination": {"s3": {"bucket": BUCKET, "prefix": PREFIX, "endpoint": s3.endpoint(),
                        "credentialsSecret": "audit-s3"}},
                    "sealEvery": "10s",
                    "retention": "30d",
                },
            }
        }),
    )
    .await;

    // -- The key, its public half in status and in the ConfigMap; no trail yet.
    let endpoints: Api<FhirEndpoint> = Api::namespaced(kube.clone(), &ns);
    let (ep, entry) = wait_for("auditLog NoCheckpointYet", WAIT, || {
        let endpoints = endpoints.clone();
        async move { audit_log_entry(&endpoints, "patients", "NoCheckpointYet").await }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.logs()));
    assert_eq!(entry.status, ComplianceStatus::Unknown);
    let audit_status = ep.status.clone().expect("status").audit.expect("status.audit");
    assert!(audit_status.destination.contains(BUCKET), "{audit_status:?}");
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let key_secret = secrets.get(&signing_key_secret("patients")).await.expect("the signing key Secret");
    assert!(
        key_secret.metadata.owner_references.as_ref().is_none_or(Vec::is_empty),
        "the signing key outlives the endpoint: no owner"
    );
    let key_data = key_secret.data.clone().unwrap_or_default();
    let signing_pem = key_data[fhir_operator::audit::SIGNING_KEY_ENTRY].0.clone();
    let public_pem = String::from_utf8(key_data[fhir_operator::audit::PUBLIC_KEY_ENTRY].0.clone()).expect("PEM");
    let config_maps: Api<ConfigMap> = Api::namespaced(kube.clone(), &ns);
    let data = config_maps.get(&gateway_config_name("patients")).await.expect("ConfigMap").data.unwrap_or_default();
    assert_eq!(data[PUBLIC_KEY_CONFIG_KEY], public_pem, "the public key is published in the ConfigMap");
    assert!(data[NGINX_CONF_KEY].contains("access_log /var/log/fhir-gateway/access.log fhir_audit;"));
    assert!(!data[NGINX_CONF_KEY].contains("syslog:"), "no UDP copy: the sidecar follows the file");

    // -- The Deployment runs the audit sidecar in place of gateway-metrics.
    let deployments: Api<Deployment> = Api::namespaced(kube.clone(), &ns);
    let deployment = deployments.get("patients").await.expect("Deployment");
    let pod_spec = deployment.spec.expect("spec").template.spec.expect("pod spec");
    assert!(pod_spec.containers.iter().all(|c| c.name != "gateway-metrics"));
    let sidecar = pod_spec.containers.iter().find(|c| c.name == AUDIT_CONTAINER).expect("the audit sidecar");
    let rendered_args = sidecar.args.clone().expect("args");
    assert_eq!(rendered_args[0], "audit-sidecar");
    assert!(rendered_args.iter().any(|a| a == &format!("--s3-bucket={BUCKET}")), "{rendered_args:?}");
    let env_names: Vec<String> = sidecar.env.iter().flatten().map(|e| e.name.clone()).collect();
    assert!(sidecar.env.iter().flatten().all(|e| e.value.is_none()), "credentials only from the Secret");
    assert_eq!(env_names, ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]);

    // -- Run it as the pod would, files where the kubelet mounts them.
    let secret_name = "partners-keys";
    let map = wait_for("the API keys", WAIT, || {
        let secrets = secrets.clone();
        async move {
            Ok(secrets.get_opt(secret_name).await?.and_then(|s| s.data).filter(|d| d.contains_key(GATEWAY_MAP_ENTRY)))
        }
    })
    .await
    .expect("keys");
    let api_key = String::from_utf8(map["current.client.reader"].0.clone()).expect("key");
    for sub in ["keys/partners", "run", "logs", "audit-key", "upstream"] {
        std::fs::create_dir_all(d.join(sub)).expect("dir");
    }
    std::fs::write(d.join("keys/partners").join(GATEWAY_MAP_ENTRY), &map[GATEWAY_MAP_ENTRY].0).expect("map");
    let key_file = d.join("audit-key").join(fhir_operator::audit::SIGNING_KEY_ENTRY);
    std::fs::write(&key_file, &signing_pem).expect("key");
    let cert = issue_certificate(Path::new("/usr/bin/openssl"), d, &["DNS:localhost", "IP:127.0.0.1"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let v = validate::validate(&ep).expect("valid");
    let in_pod = GatewaySettings {
        public_host: v.public_host.clone(),
        public_port: v.public_port,
        ..audited(&v, pod::gateway_settings(DEFAULT_LIMITS))
    };
    assert_eq!(gateway::nginx_conf(&in_pod).expect("renders"), data[NGINX_CONF_KEY], "the ConfigMap's nginx.conf");
    let path = |p: &Path| p.to_str().expect("UTF-8").to_owned();
    let access_log = d.join("logs/access.log");
    let settings = GatewaySettings {
        listen: format!("127.0.0.1:{gateway_port}"),
        upstream: format!("127.0.0.1:{upstream_port}"),
        tls_certificate: path(&cert.cert),
        tls_certificate_key: path(&cert.key),
        api_keys_map: path(&d.join("keys/*/api-keys.map")),
        temp_dir: path(&d.join("run")),
        access_log: path(&access_log),
        ..in_pod
    };
    std::fs::write(d.join("nginx.conf"), gateway::nginx_conf(&settings).expect("renders")).expect("conf");
    std::fs::write(
        d.join("upstream.conf"),
        format!(
            "worker_processes 1; pid {up}/nginx.pid; error_log stderr crit;\nevents {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {up}; proxy_temp_path {up}; fastcgi_temp_path {up};\n\
             uwsgi_temp_path {up}; scgi_temp_path {up};\n\
             server {{ listen 127.0.0.1:{upstream_port}; default_type application/fhir+json;\n\
             location / {{ return 200 '{{\"resourceType\":\"Patient\",\"id\":\"1\"}}'; }} }} }}\n",
            up = d.join("upstream").display()
        ),
    )
    .expect("upstream conf");
    let mut command = Command::new(&nginx);
    command.arg("-c").arg(d.join("upstream.conf")).args(["-g", "daemon off;"]);
    let _upstream = OwnedProcess::start("nginx", command, d.join("upstream.log"));
    let mut command = Command::new(&nginx);
    command.arg("-c").arg(d.join("nginx.conf")).args(["-g", "daemon off;"]);
    let gateway_process = OwnedProcess::start("nginx", command, d.join("nginx.log"));
    // The rendered arguments, with the pod's paths mapped to the test's.
    let mapped: Vec<String> = rendered_args[1..]
        .iter()
        .map(|a| {
            a.replace(fhir_operator::audit::ACCESS_LOG_FILE, &path(&access_log))
                .replace(
                    &format!("{}/{}", fhir_operator::audit::SIGNING_KEY_DIR, fhir_operator::audit::SIGNING_KEY_ENTRY),
                    &path(&key_file),
                )
                .replace("/etc/fhir-gateway/tls/tls.crt", &path(&cert.cert))
        })
        .collect();
    let mut command = Command::new(operator::binary());
    command
        .arg("audit-sidecar")
        .args(&mapped)
        .args(["--stream", "patients-0", "--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key());
    let sidecar_process = OwnedProcess::start("fhir-operator", command, d.join("audit-sidecar.log"));
    gateway_process.await_port(gateway_port);
    sidecar_process.await_port(metrics_port);

    // -- Requests: 40 with the key, 10 without.
    let client = Client {
        curl: PathBuf::from("/usr/bin/curl"),
        ca: cert.ca.clone(),
        public_url: public_url.clone(),
        api_key: api_key.clone(),
        dir: d.into(),
    };
    for i in 0..50 {
        let r = if i % 5 == 4 {
            client.request("GET", "/Patient/1", &[], None)
        } else {
            client.keyed("GET", &format!("/Patient/p{i}"), None)
        };
        assert_eq!(r.status, if i % 5 == 4 { 401 } else { 200 }, "{}", r.body);
    }
    let logged = std::fs::read_to_string(&access_log).unwrap_or_default().lines().count();
    assert_eq!(logged, 50, "nginx logged every request");

    // -- The operator verifies what the sidecar sealed: Pass, 50 records.
    let started = Instant::now();
    let (_, entry) = wait_for("auditLog AuditTrailVerified with 50 records", WAIT, || {
        let endpoints = endpoints.clone();
        async move {
            Ok(audit_log_entry(&endpoints, "patients", "AuditTrailVerified")
                .await?
                .filter(|(ep, _)| ep.status.as_ref().and_then(|s| s.audit.as_ref()).is_some_and(|a| a.records == 50)))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nsidecar:\n{}\noperator:\n{}", sidecar_process.log(), operator.logs()));
    eprintln!("auditLog passed {:?} after the requests: {entry:?}", started.elapsed());
    assert_eq!(entry.status, ComplianceStatus::Pass);
    assert!(entry.evidence.iter().any(|e| e == "50 records in 1 streams"), "{:?}", entry.evidence);
    let objects = s3.objects();
    assert!(objects.iter().any(|o| o.starts_with(&format!("{PREFIX}/patients-0/segments/"))), "{objects:?}");

    // -- An auditor's check with the CLI and the published key.
    std::fs::write(d.join("public.pem"), &public_pem).expect("public key");
    let verify = Command::new(operator::binary())
        .args(["audit", "verify", &format!("--s3-bucket={BUCKET}"), &format!("--s3-prefix={PREFIX}")])
        .arg(format!("--s3-endpoint={}", s3.endpoint()))
        .arg("--public-key")
        .arg(d.join("public.pem"))
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
        .output()
        .expect("audit verify");
    let said = String::from_utf8_lossy(&verify.stdout).into_owned() + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{said}");
    eprintln!("audit verify: {said}");

    // -- The same from the cluster: destination, credentials and key found by name.
    let by_name = Command::new(operator::binary())
        .args(["audit", "verify", "--endpoint", "patients", "--namespace", &ns])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .output()
        .expect("audit verify --endpoint");
    let said_by_name =
        String::from_utf8_lossy(&by_name.stdout).into_owned() + &String::from_utf8_lossy(&by_name.stderr);
    assert!(by_name.status.success(), "{said_by_name}");
    assert!(said_by_name.contains("50 records"), "{said_by_name}");

    // -- One byte of a sealed record changed: the operator says where.
    let segment = objects.iter().find(|o| o.contains("/segments/")).expect("a segment").clone();
    let file = s3.object_path(&segment);
    let mut bytes = std::fs::read(&file).expect("segment");
    let at = bytes.windows(3).position(|w| w == b"200").expect("an outcome 200 in a record");
    bytes[at + 2] = b'1';
    std::fs::write(&file, bytes).expect("tamper");
    let (_, entry) = wait_for("auditLog AuditTrailBroken", WAIT, || {
        let endpoints = endpoints.clone();
        async move { audit_log_entry(&endpoints, "patients", "AuditTrailBroken").await }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.logs()));
    eprintln!("after tampering: {entry:?}");
    assert_eq!(entry.status, ComplianceStatus::Fail);
    let name = segment.rsplit('/').next().expect("name");
    assert!(entry.message.contains(name) && entry.message.contains("seq"), "{}", entry.message);

    // -- Canary: the API key is in no record, status or operator log.
    let mut trail = String::new();
    for object in s3.objects() {
        trail.push_str(&std::fs::read_to_string(s3.object_path(&object)).unwrap_or_default());
    }
    let places: BTreeMap<&str, String> = BTreeMap::from([
        ("the trail", trail),
        ("the status", serde_json::to_string(&endpoints.get("patients").await.expect("ep").status).unwrap_or_default()),
        ("the operator's logs", operator.logs()),
        ("the sidecar's output", sidecar_process.log()),
    ]);
    for (place, text) in &places {
        assert!(!text.contains(&api_key), "the API key is in {place}");
        assert!(!text.contains(s3.secret_key()), "the S3 secret is in {place}");
    }
}
