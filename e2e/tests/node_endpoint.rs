//! What the operator deploys, running on the local node (kubelet +
//! dockershim, kube-proxy): a FhirEndpoint's pod with its three containers
//! (the Helios FHIR Server, the nginx gateway, the gateway-metrics
//! sidecar) from images built here, reached by real clients through its
//! Service's ClusterIP over TLS 1.3 with keys read from the key schedule's
//! Secret.
//!
//! Each test starts its own control plane with a node (the node lock makes
//! them take turns) and the operator binary on the host with its image
//! flags pointing at the local images.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fhir_operator::api::{FhirEndpoint, KeyRotationSchedule};
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::fhir_client::{self, Client, TestCertificate, next_link, patient};
use fhir_operator_e2e::node::Images;
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{apply_value, client_for, install_crds, venv};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, LogParams, PostParams};
use serde_json::{Value, json};

/// A control plane with a node, the operator, and a restricted namespace.
struct NodeEnv {
    plane: ControlPlane,
    client: kube::Client,
    operator: Operator,
    images: Images,
    ns: String,
    dir: tempfile::TempDir,
}

impl NodeEnv {
    async fn start(ns: &str, operator_args: &[&str]) -> Self {
        let plane = ControlPlane::start_with_node(None, Lifetime::Owned).expect("control plane with a node");
        let images = plane.node().expect("a node").images.clone();
        let client = client_for(plane.kubeconfig()).await.expect("client");
        install_crds(&client).await.expect("CRDs");
        grant_rbac(&client).await.expect("RBAC");
        let args = images.operator_args();
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(operator_args);
        let operator = Operator::start(&plane.operator_kubeconfig(), &args).expect("operator");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = serde_json::from_value(json!({
            "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}
        }))
        .unwrap();
        namespaces.create(&PostParams::default(), &namespace).await.expect("namespace");
        let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        wait("the default service account", Duration::from_secs(30), || {
            let sa = sa.clone();
            async move { sa.get_opt("default").await.ok()?.map(|_| ()) }
        })
        .await;
        let dir = tempfile::Builder::new().prefix("fhir-node-endpoint-").tempdir().expect("temp dir");
        NodeEnv { plane, client, operator, images, ns: ns.into(), dir }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply(&self, value: Value) {
        apply_value(&self.client, &self.ns, &value).await;
    }

    /// Why a test failed, from everything that could say it.
    async fn diagnose(&self, endpoint: &str) -> String {
        let mut out = String::new();
        if let Ok(e) = self.api::<FhirEndpoint>().get(endpoint).await {
            out += &format!("status: {}\n", serde_json::to_string_pretty(&e.status).unwrap_or_default());
        }
        let pods = self.api::<Pod>().list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
        for pod in pods {
            let name = pod.metadata.name.clone().unwrap_or_default();
            out += &format!("pod {name}: {}\n", serde_json::to_string(&pod.status).unwrap_or_default());
            for c in pod.spec.map(|s| s.containers).unwrap_or_default() {
                let params = LogParams { container: Some(c.name.clone()), tail_lines: Some(20), ..Default::default() };
                let logs = self.api::<Pod>().logs(&name, &params).await.unwrap_or_else(|e| e.to_string());
                out += &format!("--- {name}/{}:\n{logs}\n", c.name);
            }
        }
        out + &format!("--- operator:\n{}", tail(&self.operator.logs(), 30))
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn wait<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let check = || {
        let fut = f();
        async move { anyhow::Ok(fut.await) }
    };
    fhir_operator_e2e::wait_for(what, timeout, check).await.unwrap_or_else(|e| panic!("{e:#}"))
}

fn tool(name: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` is not installed; `make deps` installs it"))
}

/// `(status, reason)` of the endpoint's condition `type_`.
fn condition(endpoint: &FhirEndpoint, type_: &str) -> Option<(String, String)> {
    let conditions = &endpoint.status.as_ref()?.conditions;
    conditions.iter().find(|c| c.type_ == type_).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The endpoint's Service's ClusterIP, once the operator made it.
async fn cluster_ip(env: &NodeEnv, endpoint: &str) -> String {
    let services = env.api::<Service>();
    wait("the endpoint's Service", Duration::from_secs(60), || {
        let services = services.clone();
        async move { services.get_opt(endpoint).await.ok()??.spec?.cluster_ip }
    })
    .await
}

/// A kubernetes.io/tls Secret for `ip` from a fresh test CA.
async fn tls_secret(env: &NodeEnv, name: &str, ip: &str) -> TestCertificate {
    let certificate = fhir_client::issue_certificate(&tool("openssl"), env.dir.path(), &[&format!("IP:{ip}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let read = |p: &Path| ByteString(std::fs::read(p).expect("certificate file"));
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [("tls.crt".to_owned(), read(&certificate.cert)), ("tls.key".to_owned(), read(&certificate.key))].into(),
        ),
        ..Default::default()
    };
    env.api::<Secret>().create(&PostParams::default(), &secret).await.expect("TLS Secret");
    certificate
}

/// The key a client reads from the schedule's Secret right now.
async fn current_key(env: &NodeEnv, schedule: &str, client_id: &str) -> Option<String> {
    let krs = env.api::<KeyRotationSchedule>().get(schedule).await.ok()?;
    let secret = env.api::<Secret>().get(&fhir_operator::keyrotation::secret::secret_name(&krs)).await.ok()?;
    let data = secret.data?;
    let key = data.get(&format!("current.client.{client_id}"))?;
    String::from_utf8(key.0.clone()).ok()
}

/// Waits until the endpoint is Ready=True (reason Available), and returns
/// its single running pod with every container ready.
async fn ready_pod(env: &NodeEnv, endpoint: &str, timeout: Duration) -> Pod {
    let endpoints = env.api::<FhirEndpoint>();
    let pods = env.api::<Pod>();
    let waited = tokio::time::timeout(timeout, async {
        loop {
            let e = endpoints.get(endpoint).await.ok();
            // Ready and rolled out for the latest spec: right after an edit
            // the old generation's Ready and its pod are still there, and
            // the old pod keeps answering (with the old certificate) until
            // the rollout replaced it.
            let current = e
                .as_ref()
                .is_some_and(|e| e.status.as_ref().and_then(|s| s.observed_generation) == e.metadata.generation);
            let ready = current
                && e.as_ref().and_then(|e| condition(e, "Ready")) == Some(("True".into(), "Available".into()))
                && e.as_ref().and_then(|e| condition(e, "Progressing")).is_some_and(|(status, _)| status == "False");
            let selector = format!("app.kubernetes.io/instance={endpoint}");
            let list = pods.list(&ListParams::default().labels(&selector)).await.map(|l| l.items).unwrap_or_default();
            let running: Vec<Pod> = list.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
            if ready && running.len() == 1 {
                let statuses =
                    running[0].status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
                if statuses.len() == 3 && statuses.iter().all(|s| s.ready) {
                    return running[0].clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    match waited {
        Ok(pod) => pod,
        Err(_) => panic!(
            "{endpoint} not Ready with one pod of 3 ready containers within {timeout:?}:\n{}",
            env.diagnose(endpoint).await
        ),
    }
}

fn key_schedule(name: &str, clients: &[&str], interval: &str, grace: &str) -> Value {
    json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
           "metadata": {"name": name},
           "spec": {"algorithm": "api-key", "clients": clients, "interval": interval, "gracePeriod": grace}})
}

fn endpoint(name: &str, image: &str, public_url: Option<&str>, tls_secret: Option<&str>, extra: Value) -> Value {
    let mut spec = json!({
        "server": {"flavor": "helios", "image": image, "replicas": 1,
                   "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}},
        "auth": {"apiKeys": ["clients"]},
    });
    if let Some(url) = public_url {
        spec["publicUrl"] = json!(url);
    }
    if let Some(secret) = tls_secret {
        spec["tls"] = json!({"secretName": secret});
    }
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": name}, "spec": spec})
}

/// Creates the endpoint, then gives it a certificate for its ClusterIP and
/// that address as its public URL (the Service's address is known only
/// once the operator made it). Returns a curl client on the public URL.
async fn serve_on_cluster_ip(env: &NodeEnv, name: &str, extra: Value) -> (Client, Pod) {
    env.apply(key_schedule("clients", &["portal"], "720h", "1h")).await;
    env.apply(endpoint(name, &env.images.hfs, None, None, extra.clone())).await;
    let ip = cluster_ip(env, name).await;
    let public_url = format!("https://{ip}");
    let certificate = tls_secret(env, &format!("{name}-public-tls"), &ip).await;
    env.apply(endpoint(name, &env.images.hfs, Some(&public_url), Some(&format!("{name}-public-tls")), extra)).await;
    let pod = ready_pod(env, name, Duration::from_secs(180)).await;
    let api_key = wait("the client's key in the schedule's Secret", Duration::from_secs(30), || {
        current_key(env, "clients", "portal")
    })
    .await;
    let client = Client { curl: tool("curl"), ca: certificate.ca, public_url, api_key, dir: env.dir.path().to_owned() };
    (client, pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_runs_on_the_node_and_serves_fhir_over_tls_13_through_its_cluster_ip() {
    let t0 = Instant::now();
    let env = NodeEnv::start("node-endpoint", &[]).await;
    let started = t0.elapsed();
    let t = Instant::now();
    let (client, pod) = serve_on_cluster_ip(&env, "fhir", json!({})).await;
    let ready = t.elapsed();

    // The pod: three containers, from the local images, all ready.
    let spec = pod.spec.clone().unwrap();
    let images: Vec<(String, String)> =
        spec.containers.iter().map(|c| (c.name.clone(), c.image.clone().unwrap_or_default())).collect();
    assert_eq!(images.len(), 3, "{images:?}");
    for image in [&env.images.hfs, &env.images.nginx, &env.images.operator] {
        assert!(images.iter().any(|(_, i)| i == image), "{image} runs: {images:?}");
    }
    assert_eq!(spec.node_name.as_deref(), Some(env.plane.node().unwrap().name.as_str()));

    // Through the ClusterIP: the CapabilityStatement with the key, 401
    // without, and no TLS 1.2.
    let t = Instant::now();
    let metadata = wait("the CapabilityStatement through the ClusterIP", Duration::from_secs(30), || async {
        let r = client.try_request("GET", "/metadata", &[("X-API-Key", &client.api_key)], None).ok()?;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");
    let answered = t.elapsed();
    for headers in [vec![], vec![("X-API-Key", "0".repeat(43))]] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = client.request("GET", "/Patient", &headers, None);
        assert_eq!(r.status, 401, "without a valid key: {}", r.body);
    }
    assert!(client.tls12_refused(), "TLS 1.2 is refused");

    // FHIR: creates answer with a Location on the public URL; a real client
    // follows next pages over https; the conformance smoke suite passes.
    let mut ids = Vec::new();
    for family in ["Abbott", "Baker", "Carter"] {
        let r = client.keyed("POST", "/Patient", Some(&patient(family)));
        assert_eq!(r.status, 201, "create {family}: {}", r.body);
        let location = r.header("Location").unwrap_or_else(|| panic!("no Location: {:?}", r.headers));
        assert!(location.starts_with(&format!("{}/Patient/", client.public_url)), "Location {location}");
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    let page = client.keyed("GET", "/Patient?_count=1", None);
    let next = next_link(&page.json()).unwrap_or_else(|| panic!("no next link: {}", page.body));
    assert!(next.starts_with(&format!("{}/", client.public_url)), "next {next}");
    let python = venv::tool("python").unwrap_or_else(|e| panic!("{e:#}"));
    let out = fhir_client::fhirpy_pages(&python, &client.public_url, &client.api_key, &client.ca)
        .unwrap_or_else(|e| panic!("{e:#}"));
    ids.sort();
    assert_eq!(out["ids"], json!(ids), "fhirpy followed every page: {out}");
    let sekmet = venv::tool("sekmet").unwrap_or_else(|e| panic!("{e:#}"));
    let smoke = fhir_client::conformance_smoke(
        &sekmet,
        &env.dir.path().join("sekmet"),
        &client.public_url,
        &client.api_key,
        &client.ca,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(smoke.failed, 0, "{}", smoke.output);
    assert!(smoke.passed >= 14, "conformance_smoke ran its steps: {}", smoke.output);

    // The canary: the key is in no pod log, and in no container's
    // environment as the kubelet sees it (keys are mounted files).
    let pods = env.api::<Pod>();
    let name = pod.metadata.name.clone().unwrap();
    for c in &spec.containers {
        let params = LogParams { container: Some(c.name.clone()), ..Default::default() };
        let logs = pods.logs(&name, &params).await.expect("logs");
        assert!(!logs.contains(&client.api_key), "the key is in the {} container's log", c.name);
        let env_text = serde_json::to_string(&c.env).unwrap();
        assert!(!env_text.contains(&client.api_key), "the key is in the {} container's env", c.name);
    }
    let deployment = env.api::<Deployment>().get("fhir").await.expect("deployment");
    assert!(!serde_json::to_string(&deployment).unwrap().contains(&client.api_key));
    // What the kubelet handed the engine: every container's environment
    // and command line.
    let containers = fhir_operator_e2e::node::node_containers(&env.plane.dir().join("kubelet"));
    assert!(containers.len() >= 4, "the pod's sandbox and three containers: {containers:?}");
    for id in &containers {
        let out = std::process::Command::new("docker")
            .args(["inspect", "--format", "{{json .Config.Env}} {{json .Args}} {{json .Config.Cmd}}", id])
            .output()
            .expect("docker inspect");
        assert!(out.status.success(), "docker inspect {id}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&client.api_key),
            "the key is in container {id}'s environment or command line"
        );
    }

    println!(
        "node endpoint: control plane + node + operator {started:.1?}, endpoint Ready (pod of 3 containers) \
         {ready:.1?}, CapabilityStatement through the ClusterIP {answered:.1?}; conformance_smoke {} passed, \
         {} warnings, {} skipped; fhirpy followed {} pages",
        smoke.passed,
        smoke.warnings,
        smoke.skipped,
        ids.len()
    );
}

/// One request of the load: when it was sent, the key's version, and what
/// came back.
#[derive(Debug, Clone)]
struct Sent {
    at: Duration,
    outcome: Result<u16, String>,
}

/// Sends GET /metadata at `per_second` with the key `key` holds (updated by
/// the caller as a client re-reading the Secret would), until `stop`.
fn load(
    client: Client,
    key: std::sync::Arc<std::sync::Mutex<String>>,
    per_second: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Sent>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let period = Duration::from_secs(1) / per_second;
        let mut sent = Vec::new();
        let mut next = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let key = key.lock().unwrap().clone();
            let at = start.elapsed();
            let outcome = client
                .try_request("GET", "/metadata", &[("X-API-Key", &key)], None)
                .map(|r| r.status)
                .map_err(|e| format!("{e:#}").lines().last().unwrap_or_default().to_owned());
            sent.push(Sent { at, outcome });
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        sent
    })
}

/// `n` requests as fast as curl goes: how many got 200 and how many 429.
fn burst(client: &Client, n: usize) -> (usize, usize) {
    let statuses: Vec<u16> = (0..n).map(|_| client.keyed("GET", "/metadata", None).status).collect();
    (statuses.iter().filter(|s| **s == 200).count(), statuses.iter().filter(|s| **s == 429).count())
}

/// Waits until the Deployment's rollout of a template other than `old` is
/// complete: returns the new template's ReplicaSet hash.
async fn rolled(env: &NodeEnv, name: &str, old: &str, timeout: Duration) -> String {
    let deployments = env.api::<Deployment>();
    let pods = env.api::<Pod>();
    wait("the rollout", timeout, || {
        let (deployments, pods) = (deployments.clone(), pods.clone());
        async move {
            let d = deployments.get(name).await.ok()?;
            let status = d.status.clone()?;
            let done = status.observed_generation == d.metadata.generation
                && status.updated_replicas == Some(1)
                && status.replicas == Some(1)
                && status.available_replicas == Some(1);
            if !done {
                return None;
            }
            let selector = format!("app.kubernetes.io/instance={name}");
            let list = pods.list(&ListParams::default().labels(&selector)).await.ok()?.items;
            let hashes: Vec<String> =
                list.iter().filter_map(|p| p.metadata.labels.as_ref()?.get("pod-template-hash").cloned()).collect();
            (hashes.len() == 1 && hashes[0] != old).then(|| hashes[0].clone())
        }
    })
    .await
}

fn template_hash(pod: &Pod) -> String {
    pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash").cloned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_twice_under_load_without_a_failed_request_and_a_tier_edit_is_enforced_by_new_pods() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let env = NodeEnv::start("node-rotation", &[]).await;
    let tier = |rps: u32| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "RateLimitTier",
               "metadata": {"name": "node-e2e"}, "spec": {"requestsPerSecond": rps, "burst": 1}})
    };
    env.apply(tier(1000)).await;
    let extra = json!({"rateLimit": {"tier": "node-e2e"}});
    let (client, pod) = serve_on_cluster_ip(&env, "fhir", extra.clone()).await;

    // -- Two rotations while a client sends 20 requests a second with the
    // key that is current in the Secret, re-read every 500 ms.
    let key = Arc::new(Mutex::new(client.api_key.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = load(client.clone(), key.clone(), 20, stop.clone());
    let reader = {
        let (key, stop) = (key.clone(), stop.clone());
        let env_client = env.client.clone();
        let ns = env.ns.clone();
        tokio::spawn(async move {
            let krs: Api<KeyRotationSchedule> = Api::namespaced(env_client.clone(), &ns);
            let secrets: Api<Secret> = Api::namespaced(env_client, &ns);
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(schedule) = krs.get("clients").await
                    && let Ok(secret) = secrets.get(&fhir_operator::keyrotation::secret::secret_name(&schedule)).await
                    && let Some(k) = secret.data.as_ref().and_then(|d| d.get("current.client.portal"))
                {
                    let k = String::from_utf8_lossy(&k.0).into_owned();
                    if !seen.contains(&k) {
                        seen.push(k.clone());
                    }
                    *key.lock().unwrap() = k;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            seen.len()
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t_rotation = Instant::now();
    env.apply(key_schedule("clients", &["portal"], "20s", "10s")).await;
    let krs_api = env.api::<KeyRotationSchedule>();
    wait("two rotations, complete", Duration::from_secs(240), || {
        let krs_api = krs_api.clone();
        async move {
            let s = krs_api.get("clients").await.ok()?.status?;
            (s.current_version? >= 3 && s.rotation.is_none()).then_some(())
        }
    })
    .await;
    env.apply(key_schedule("clients", &["portal"], "720h", "10s")).await;
    let rotations_took = t_rotation.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("load thread");
    let keys_seen = reader.await.expect("key reader");
    let failed: Vec<&Sent> = sent.iter().filter(|s| s.outcome != Ok(200)).collect();
    println!(
        "rotation under load: 2 rotations in {rotations_took:.1?}; {} requests at 20/s over {:.1?} with \
         {keys_seen} keys, {} failed",
        sent.len(),
        sent.last().map(|s| s.at).unwrap_or_default(),
        failed.len()
    );
    assert!(keys_seen >= 3, "the client saw the keys of versions 1, 2 and 3: {keys_seen}");
    assert!(failed.is_empty(), "failed requests during the rotations: {failed:?}\n{}", env.diagnose("fhir").await);

    // -- A tier edit rolls the pods, and the new pods enforce the new rate.
    let api_key = current_key(&env, "clients", "portal").await.expect("current key");
    let client = Client { api_key, ..client };
    let before = template_hash(&ready_pod(&env, "fhir", Duration::from_secs(60)).await);
    assert_ne!(before, template_hash(&pod), "the rotations rolled the pod");
    let (ok, limited) = burst(&client, 20);
    assert_eq!((ok, limited), (20, 0), "1000/s: nothing limited");
    env.apply(tier(1)).await;
    let t_tier = Instant::now();
    let after = rolled(&env, "fhir", &before, Duration::from_secs(120)).await;
    let tier_rolled = t_tier.elapsed();
    let (ok, limited) = burst(&client, 20);
    println!("tier 1000/s -> 1/s: rolled in {tier_rolled:.1?}; 20 requests at once: {ok} answered, {limited} got 429");
    assert!(
        limited >= 15 && ok >= 1,
        "1/s with burst 1: most of 20 requests at once are refused ({ok} ok, {limited} 429)"
    );
    assert_ne!(after, before);
}

/// Applies a manifest of `e2e/manifests/`, its placeholders replaced.
async fn apply_manifest(env: &NodeEnv, text: &str, replace: &[(&str, &str)]) {
    let text = replace.iter().fold(text.to_owned(), |t, (from, to)| t.replace(from, to));
    for doc in text.split("\n---\n") {
        let value: Value = serde_yaml::from_str(doc).expect("manifest YAML");
        if value["kind"] == "PersistentVolume" {
            let volumes: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(env.client.clone());
            let pv = serde_json::from_value(value).expect("PersistentVolume");
            volumes.create(&PostParams::default(), &pv).await.expect("PersistentVolume");
        } else {
            env.apply(value).await;
        }
    }
}

/// PostgreSQL 15 in a restricted pod (`e2e/manifests/postgres.yaml`, as
/// `make demo` runs it): the Secret patients-db-credentials's user owns
/// the database `fhir`.
async fn postgres_pod(env: &NodeEnv) {
    let manifest = include_str!("../manifests/postgres.yaml");
    apply_manifest(env, manifest, &[("IMAGE", &env.images.postgres)]).await;
}

/// The claim `fhir-backups` on a host directory owned by the Jobs' uid 999
/// (`e2e/manifests/backup-volume.yaml`): the backups' destination, readable
/// here.
async fn host_volume(env: &NodeEnv) -> PathBuf {
    let dir = env.dir.path().join("backups");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(999), Some(999)).unwrap();
    let manifest = include_str!("../manifests/backup-volume.yaml");
    apply_manifest(env, manifest, &[("NAMESPACE", &env.ns), ("HOST_DIR", dir.to_str().unwrap())]).await;
    dir
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_backup_and_a_restore_drill_run_in_pods_against_the_database_pod() {
    use fhir_operator::api::{BackupPolicy, ComplianceCheck, ComplianceStatus};
    // Cron slots at 60 times real time: "*/30 * * * *" is every 30 s.
    let origin = k8s_openapi::jiff::Timestamp::now().to_string();
    let clock = [format!("--backup-clock-origin={origin}"), "--backup-clock-rate=60".into()];
    let clock: Vec<&str> = clock.iter().map(String::as_str).collect();
    let env = NodeEnv::start("node-backup", &clock).await;

    // The database: PostgreSQL 15 in a pod, reached by its ClusterIP (the
    // node runs no cluster DNS).
    env.apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "patients-db-credentials"},
                     "stringData": {"username": "fhir", "password": "s3cret:p@ss/word"}}))
        .await;
    postgres_pod(&env).await;
    let db_ip = cluster_ip(&env, "patients-db").await;
    let database = json!({"database": {"host": db_ip, "name": "fhir", "credentialsSecret": "patients-db-credentials",
                                       "sslMode": "disable"}});
    let (client, _) = serve_on_cluster_ip(&env, "patients", database).await;
    // Real FHIR data in the database, through the gateway.
    for family in ["Abbott", "Baker", "Carter", "Dalton"] {
        let r = client.keyed("POST", "/Patient", Some(&patient(family)));
        assert_eq!(r.status, 201, "create {family}: {}", r.body);
    }

    // The policy: backups onto a claim, encrypted with an AES key schedule,
    // and a restore drill.
    let backups = host_volume(&env).await;
    env.apply(json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
                     "metadata": {"name": "backup-key"},
                     "spec": {"algorithm": "aes-256", "interval": "90d", "gracePeriod": "720h"}}))
        .await;
    let t = Instant::now();
    env.apply(json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "BackupPolicy",
                     "metadata": {"name": "nightly"},
                     "spec": {"endpoint": "patients", "schedule": "*/30 * * * *",
                              "destination": {"persistentVolumeClaim": {"claimName": "fhir-backups"}},
                              "encryption": {"keySchedule": "backup-key"},
                              "restoreDrill": {"schedule": "*/30 * * * *"}}}))
        .await;
    let policies = env.api::<BackupPolicy>();
    let waited = tokio::time::timeout(Duration::from_secs(150), async {
        loop {
            if let Ok(p) = policies.get("nightly").await
                && let Some(status) = p.status
                && status.last_successful_backup.is_some()
                && status.last_verified_restore.is_some()
            {
                return status;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    let status = match waited {
        Ok(status) => status,
        Err(_) => {
            let p = policies.get("nightly").await.ok().and_then(|p| p.status);
            let jobs = env.api::<k8s_openapi::api::batch::v1::Job>().list(&ListParams::default()).await;
            panic!(
                "no verified backup within 150 s: {p:#?}\njobs: {:#?}\n{}",
                jobs.map(|l| l.items.into_iter().map(|j| (j.metadata.name, j.status)).collect::<Vec<_>>()),
                env.diagnose("patients").await
            );
        }
    };
    let verified = t.elapsed();
    let backup = status.last_successful_backup.clone().unwrap();
    let restore = status.last_verified_restore.clone().unwrap();
    println!("backup on the node: {backup:?}\nrestore drill: {restore:?}\nboth within {verified:.1?}");

    // The object is on the volume, of the size status records.
    let files = files_under(&backups);
    let size = backup.size_bytes.expect("size in status");
    assert!(
        files.iter().any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() as i64 == size)),
        "a file of {size} bytes under {}: {files:?}",
        backups.display()
    );
    // The Jobs' pods ran on the node.
    let pods = env.api::<Pod>().list(&ListParams::default().labels("fhiroperator.io/backup-policy=nightly")).await;
    let pods = pods.expect("pods").items;
    let node = env.plane.node().unwrap().name.clone();
    assert!(
        pods.iter().any(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node.as_str())
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")),
        "a backup pod succeeded on the node: {:?}",
        pods.iter()
            .map(|p| (p.metadata.name.clone(), p.status.as_ref().and_then(|s| s.phase.clone())))
            .collect::<Vec<_>>()
    );
    // The endpoint's backup compliance entry, from the real runs.
    let endpoints = env.api::<FhirEndpoint>();
    let entry = wait("the backup compliance entry Pass", Duration::from_secs(60), || {
        let endpoints = endpoints.clone();
        async move {
            let e = endpoints.get("patients").await.ok()?;
            let entry = e.status?.compliance.into_iter().find(|c| c.name == ComplianceCheck::Backup)?;
            (entry.status == ComplianceStatus::Pass).then_some(entry)
        }
    })
    .await;
    println!("backup compliance: {} ({})", entry.reason, entry.message);
}
