//! The KeyRotationSchedule controller against a real kube-apiserver and
//! kube-controller-manager, run as the real `fhir-operator` binary with
//! exactly its RBAC, on intervals of a few seconds: rotations, the consumer
//! rollouts they cause (and no others), a real nginx fed the keys of the
//! grace window and after it, kill -9 at random points of rotations, and a
//! scan of everything the operator writes or says for the keys it made.

#[path = "../../operator/tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fhir_operator::api::{FhirEndpoint, KeyRotationSchedule, KeyVersionState, RotationPhase};
use fhir_operator::fhirendpoint::build::KEYS_HASH_ANNOTATION;
use fhir_operator::keyrotation::keys::{self, GATEWAY_MAP_ENTRY};
use fhir_operator::keyrotation::rotation::{ROTATE_ANNOTATION, fingerprint};
use fhir_operator::meta::hash_of;
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{apply_value, cluster, install_crds, namespace, stand_in_kubelet, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const ENDPOINT: &str = "records";
const API_KEYS: &str = "records-clients";

struct Env {
    client: Client,
    ns: String,
    operator: Operator,
    kubelet_stop: Arc<AtomicBool>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kubelet_stop.store(true, Ordering::SeqCst);
    }
}

/// A control plane, the operator, and a stand-in kubelet that marks every
/// pod of the namespace ready (there is none), so that Deployments roll out
/// through the real controllers.
async fn setup(prefix: &str) -> Env {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let ns = namespace(&client, prefix).await.expect("namespace");
    let operator = Operator::start(cluster.operator_kubeconfig(), &[]).expect("operator");
    let kubelet_stop = Arc::new(AtomicBool::new(false));
    stand_in_kubelet(client.clone(), ns.clone(), kubelet_stop.clone());
    Env { client, ns, operator, kubelet_stop }
}

/// An api-key schedule with two clients and the endpoint that uses it.
async fn apply_schedule_and_endpoint(env: &Env, interval: &str, grace: &str) {
    let schedule = json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
        "metadata": {"name": API_KEYS},
        "spec": {"algorithm": "api-key", "clients": ["billing", "portal"], "interval": interval, "gracePeriod": grace},
    });
    let endpoint = json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": ENDPOINT},
        "spec": {"auth": {"apiKeys": [API_KEYS]}},
    });
    apply_value(&env.client, &env.ns, &schedule).await;
    apply_value(&env.client, &env.ns, &endpoint).await;
}

/// What one look at the cluster saw.
#[derive(Debug, Clone)]
struct Sample {
    schedule: KeyRotationSchedule,
    /// The Secret's data, read after the schedule (the operator writes the
    /// Secret before the status, so this is at least as new).
    secret: BTreeMap<String, ByteString>,
    deployment_generation: i64,
    keys_hash: String,
}

async fn sample(client: &Client, ns: &str) -> Option<Sample> {
    let schedule = Api::<KeyRotationSchedule>::namespaced(client.clone(), ns).get(API_KEYS).await.ok()?;
    let secret = Api::<Secret>::namespaced(client.clone(), ns).get_opt(&format!("{API_KEYS}-keys")).await.ok()?;
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns).get_opt(ENDPOINT).await.ok()??;
    let keys_hash = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(KEYS_HASH_ANNOTATION).cloned())
        .unwrap_or_default();
    Some(Sample {
        schedule,
        secret: secret.and_then(|s| s.data).unwrap_or_default(),
        deployment_generation: deployment.metadata.generation.unwrap_or_default(),
        keys_hash,
    })
}

fn current(s: &Sample) -> i64 {
    s.schedule.status.as_ref().and_then(|st| st.current_version).unwrap_or(0)
}

fn phase(s: &Sample) -> Option<RotationPhase> {
    s.schedule.status.as_ref()?.rotation.as_ref().map(|r| r.phase)
}

fn token(data: &BTreeMap<String, ByteString>, version: i64) -> Option<String> {
    keys::client_token(data, version, "billing").ok().map(str::to_owned)
}

fn map_of(data: &BTreeMap<String, ByteString>) -> String {
    data.get(GATEWAY_MAP_ENTRY).map(|m| String::from_utf8_lossy(&m.0).into_owned()).unwrap_or_default()
}

/// The pod-template annotation the endpoint controller derives from a key
/// set fingerprint of its one schedule.
fn expected_keys_hash(fingerprint: &str) -> String {
    hash_of(&vec![(API_KEYS, fingerprint)])
}

#[tokio::test]
async fn keys_rotate_with_a_grace_window_and_consumers_roll_exactly_when_the_accepted_set_changes() {
    let env = setup("krs-rotate").await;
    apply_schedule_and_endpoint(&env, "8s", "3s").await;
    let (client, ns) = (&env.client, env.ns.as_str());

    // Watch two full rotations (version 1 → 3), sampling every 100 ms.
    let mut samples: Vec<Sample> = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = sample(client, ns).await {
            let done = current(&s) >= 3 && phase(&s).is_none();
            samples.push(s);
            if done {
                break;
            }
        }
        assert!(Instant::now() < deadline, "two rotations did not complete within {WAIT:?}: {:#?}", samples.last());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every phase was seen, in order, for both rotations.
    let mut phases: Vec<(i64, Option<RotationPhase>)> = samples.iter().map(|s| (current(s), phase(s))).collect();
    phases.dedup();
    assert_eq!(
        phases.iter().filter(|(_, p)| p.is_some()).cloned().collect::<Vec<_>>(),
        vec![
            (1, Some(RotationPhase::Created)),
            (2, Some(RotationPhase::ConsumersRolled)),
            (2, Some(RotationPhase::Retired)),
            (2, Some(RotationPhase::Created)),
            (3, Some(RotationPhase::ConsumersRolled)),
            (3, Some(RotationPhase::Retired)),
        ],
        "{phases:?}"
    );

    // The Deployment's pod template changes exactly when the accepted key
    // set does: its keys hash always matches the schedule's fingerprint of
    // the moment (or the one just before, while the endpoint catches up),
    // and its generation moves only with the keys hash.
    let fingerprints: Vec<String> = dedup(samples.iter().map(|s| fingerprint(s.schedule.status.as_ref().unwrap())));
    let expected: Vec<String> = fingerprints.iter().map(|f| expected_keys_hash(f)).collect();
    let mut hashes: Vec<String> = dedup(samples.iter().map(|s| s.keys_hash.clone()));
    // The Deployment may predate the schedule's first status.
    let before_any_key = expected_keys_hash(&fingerprint(&Default::default()));
    if hashes.first() == Some(&before_any_key) && expected.first() != Some(&before_any_key) {
        hashes.remove(0);
    }
    // 1 → {1,2} → {2} → {2,3} → {3}: five accepted sets, and the promotions
    // in between (version 2 becoming current within {1,2}) change nothing.
    assert_eq!(fingerprints.len(), 5, "{fingerprints:?}");
    assert_eq!(hashes, expected, "the pod template's key hashes follow the accepted key sets, one for one");
    for pair in samples.windows(2) {
        if pair[0].deployment_generation != pair[1].deployment_generation {
            assert_ne!(pair[0].keys_hash, pair[1].keys_hash, "the Deployment changed without a key set change");
        }
    }
    let first = samples.first().unwrap().deployment_generation;
    let last = samples.last().unwrap().deployment_generation;
    let rollouts = dedup(samples.iter().map(|s| s.keys_hash.clone())).len() as i64 - 1;
    assert_eq!(last - first, rollouts, "one Deployment change per key set change, none other");

    // The gateway's map: both tokens of billing in the grace window, only
    // the new one after it.
    let grace = samples
        .iter()
        .find(|s| current(s) == 2 && phase(s) == Some(RotationPhase::ConsumersRolled))
        .expect("a sample in the grace window");
    let (old, new) = (token(&grace.secret, 1).expect("v1 token"), token(&grace.secret, 2).expect("v2 token"));
    assert!(map_of(&grace.secret).contains(&old) && map_of(&grace.secret).contains(&new));
    assert_eq!(keys::client_token(&grace.secret, 2, "billing").ok(), Some(new.as_str()));
    let current_alias = String::from_utf8(grace.secret["current.client.billing"].0.clone()).unwrap();
    assert_eq!(current_alias, new, "clients read current.client.<id>");
    let after = samples
        .iter()
        .find(|s| current(s) == 2 && phase(s) == Some(RotationPhase::Retired))
        .expect("a sample after the grace window");
    assert!(!map_of(&after.secret).contains(&old) && map_of(&after.secret).contains(&new));
    let v1 = after.schedule.status.as_ref().unwrap().versions.iter().find(|v| v.version == 1).unwrap();
    assert_eq!(v1.state, KeyVersionState::Retired);
    assert!(after.secret.contains_key("v1.client.billing"), "retired versions stay while keepVersions allows");

    // A real nginx, configured from the endpoint's own ConfigMap and
    // certificate, accepts the old key with the grace-window map and
    // refuses it with the later one.
    let gateway = live_gateway_inputs(client, ns).await;
    assert_eq!(gateway_status(&gateway, &map_of(&grace.secret), &[&old, &new, "not-a-key"]), [200, 200, 401]);
    assert_eq!(gateway_status(&gateway, &map_of(&after.secret), &[&old, &new]), [401, 200]);

    // Status, events and metrics tell the story; the endpoint's status
    // names the versions its gateway accepts.
    let events = events(client, ns).await;
    for reason in ["KeyIssued", "RotationStarted", "KeyRotated", "KeyRetired", "RotationCompleted"] {
        assert!(events.iter().any(|e| e.reason.as_deref() == Some(reason)), "no {reason} event: {events:#?}");
    }
    let metrics = env.operator.metrics();
    assert!(metrics.contains("fhir_operator_key_rotation_steps_total{step=\"KeyRotated\"}"), "{metrics}");
    let ep: FhirEndpoint = Api::namespaced(client.clone(), ns).get(ENDPOINT).await.unwrap();
    let in_force = &ep.status.unwrap().key_versions;
    assert_eq!(in_force.len(), 1);
    assert_eq!(in_force[0].versions, vec![3]);
    let status = samples.last().unwrap().schedule.status.clone().unwrap();
    assert_eq!(status.consumers.len(), 1);
    assert!(status.next_rotation_time.is_some() && status.last_rotation_time.is_some());
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if out.last() != Some(&item) {
            out.push(item);
        }
    }
    out
}

async fn events(client: &Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns).list(&ListParams::default()).await.expect("events").items
}

/// The endpoint's nginx.conf and certificate, as its pods would get them.
struct GatewayInputs {
    conf: String,
    cert: Vec<u8>,
    key: Vec<u8>,
}

async fn live_gateway_inputs(client: &Client, ns: &str) -> GatewayInputs {
    let conf: ConfigMap = Api::namespaced(client.clone(), ns).get(&format!("{ENDPOINT}-gateway")).await.unwrap();
    let conf = conf.data.unwrap()["nginx.conf"].clone();
    let tls: Secret = Api::namespaced(client.clone(), ns).get(&format!("{ENDPOINT}-tls")).await.unwrap();
    let data = tls.data.unwrap();
    GatewayInputs { conf, cert: data["tls.crt"].0.clone(), key: data["tls.key"].0.clone() }
}

/// Starts nginx on `inputs` with `map` as the schedule's mounted key map,
/// in front of a stub FHIR server, and returns the status code of a FHIR
/// request with each API key.
fn gateway_status(inputs: &GatewayInputs, map: &str, api_keys: &[&str]) -> Vec<u16> {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["tls", "run", &format!("keys/{API_KEYS}")] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::write(root.join("tls/tls.crt"), &inputs.cert).unwrap();
    std::fs::write(root.join("tls/tls.key"), &inputs.key).unwrap();
    std::fs::write(root.join(format!("keys/{API_KEYS}/{GATEWAY_MAP_ENTRY}")), map).unwrap();
    let upstream = stub_fhir_server();
    let port = support::free_port();
    let r = root.to_str().unwrap();
    // The pod's paths become the temp dir's; ports become free loopback ones.
    let conf = inputs
        .conf
        .replace(" /tmp/", &format!(" {r}/run/"))
        .replace("/etc/fhir-gateway/", &format!("{r}/"))
        .replace("/dev/stdout", &format!("{r}/access.log"))
        .replace("127.0.0.1:5140", &format!("127.0.0.1:{}", support::free_port()))
        .replace("listen 8443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
        .replace("server 127.0.0.1:8080;", &format!("server 127.0.0.1:{upstream};"));
    let conf_path = root.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    make_readable_by_nobody(root);
    let _nginx = support::Nginx::start(&conf_path, root, port);
    api_keys
        .iter()
        .map(|key| {
            let out = Command::new(support::tool(&support::CURL))
                .args(["-sk", "--tlsv1.3", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
                .arg(format!("X-API-Key: {key}"))
                .arg(format!("https://127.0.0.1:{port}/fhir/Patient"))
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
        })
        .collect()
}

/// nginx runs as nobody when the tests run as root: it must read the files.
fn make_readable_by_nobody(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if !support::running_as_root() {
        return;
    }
    for entry in walk(root) {
        let mode = if entry.is_dir() { 0o777 } else { 0o644 };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if root.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&entry.unwrap().path()));
        }
    }
    out
}

/// A FHIR server stand-in answering 200 to anything; returns its port.
fn stub_fhir_server() -> u16 {
    use std::io::{Read, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

/// A tiny xorshift generator: random kill timings, seeded and printed so
/// that a failing run can be repeated (`FHIR_E2E_SEED`).
struct Random(u64);

impl Random {
    fn new() -> Self {
        let seed = std::env::var("FHIR_E2E_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
        });
        eprintln!("kill timings: FHIR_E2E_SEED={seed}");
        Self(seed)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(from + self.0 % (to - from))
    }
}

/// Checks, on every sample, what a crash must never break.
#[derive(Default)]
struct Invariants {
    /// The billing token of every version seen, to prove none is made twice.
    tokens: BTreeMap<i64, String>,
    /// Versions seen current or previous, with the expiry last seen.
    valid: BTreeMap<i64, Option<k8s_openapi::jiff::Timestamp>>,
}

impl Invariants {
    fn check(&mut self, s: &Sample) {
        let Some(status) = s.schedule.status.as_ref() else { return };
        let now = k8s_openapi::jiff::Timestamp::now();
        for v in &status.versions {
            if matches!(v.state, KeyVersionState::Current | KeyVersionState::Previous) {
                self.valid.insert(v.version, v.expires_at.as_ref().map(|t| t.0));
            }
        }
        for (version, expiry) in &self.valid {
            // One second of slack for the two clocks' reads.
            let expired = expiry.is_some_and(|e| now > e + k8s_openapi::jiff::SignedDuration::from_secs(1));
            if !expired {
                assert!(
                    token(&s.secret, *version).is_some(),
                    "version {version} was valid (until {expiry:?}) and is gone from the Secret at {now}"
                );
            }
        }
        for version in keys::versions(&s.secret) {
            let Some(t) = token(&s.secret, version) else { continue };
            let seen = self.tokens.entry(version).or_insert_with(|| t.clone());
            assert_eq!(*seen, t, "version {version} was generated twice");
        }
    }
}

#[tokio::test]
async fn kill_9_at_random_points_of_rotations_never_loses_or_duplicates_a_key() {
    let mut env = setup("krs-crash").await;
    apply_schedule_and_endpoint(&env, "4s", "2s").await;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let mut invariants = Invariants::default();
    let mut random = Random::new();
    let kills = 20;
    let started = Instant::now();
    for kill in 0..kills {
        let until = Instant::now() + random.millis(300, 2500);
        while Instant::now() < until {
            if let Some(s) = sample(&client, &ns).await {
                invariants.check(&s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = sample(&client, &ns).await.map(|s| (current(&s), phase(&s)));
        env.operator.kill9();
        eprintln!("kill {}/{kills} at {before:?}", kill + 1);
        env.operator = Operator::start(cluster().operator_kubeconfig(), &[]).expect("operator restarts");
    }
    let elapsed = started.elapsed();
    // The sequence completes once the kills stop.
    let last_kill = sample(&client, &ns).await.map(|s| current(&s)).unwrap_or(0);
    let done = wait_for("a rotation after the last kill completes", WAIT, || {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let s = sample(&client, &ns).await;
            Ok(s.filter(|s| current(s) > last_kill && phase(s).is_none()))
        }
    })
    .await
    .expect("rotations go on after the kills");
    invariants.check(&done);
    let versions: Vec<i64> = invariants.tokens.keys().copied().collect();
    assert_eq!(versions, (1..=*versions.last().unwrap()).collect::<Vec<_>>(), "versions are consecutive");
    // No more versions than slots: one per 4 s interval at most, plus the first.
    let slots = (started.elapsed().as_secs() / 4 + 1) as usize;
    assert!(versions.len() <= slots + 1, "{} versions in {slots} slots", versions.len());
    assert!(versions.len() >= 3, "rotations happened while being killed: {versions:?} in {elapsed:?}");
    let logs = env.operator.logs();
    assert!(!logs.contains("panicked"), "{logs}");
}

#[tokio::test]
async fn every_algorithm_and_no_key_material_anywhere_but_the_secret() {
    let env = setup("krs-canary").await;
    let (client, ns) = (&env.client, env.ns.as_str());
    apply_schedule_and_endpoint(&env, "6s", "2s").await;
    for (name, algorithm) in [("backup-key", "aes-256"), ("signing", "ecdsa-p256"), ("webhooks", "hmac-sha256")] {
        let schedule = json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
            "metadata": {"name": name},
            "spec": {"algorithm": algorithm, "interval": "6s", "gracePeriod": "2s"},
        });
        apply_value(client, ns, &schedule).await;
    }
    let schedules: Api<KeyRotationSchedule> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);

    // Collect every key the operator generates over a few rotations.
    let mut material: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    let mut requested = false;
    loop {
        for s in secrets.list(&ListParams::default().labels("fhiroperator.io/key-schedule")).await.unwrap() {
            for (entry, value) in s.data.unwrap_or_default() {
                if !entry.ends_with("public.pem") && entry != GATEWAY_MAP_ENTRY {
                    material.extend(forms_of(&value.0));
                }
            }
        }
        let all = schedules.list(&ListParams::default()).await.unwrap().items;
        let versions: Vec<i64> =
            all.iter().map(|k| k.status.as_ref().and_then(|s| s.current_version).unwrap_or(0)).collect();
        if versions.iter().all(|v| *v >= 3) {
            break;
        }
        // A manual rotation, once.
        if !requested && versions.iter().all(|v| *v >= 1) {
            let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: "now-1"}}});
            schedules.patch("webhooks", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            requested = true;
        }
        assert!(Instant::now() < deadline, "schedules did not reach version 3: {versions:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let webhooks = schedules.get("webhooks").await.unwrap();
    assert_eq!(webhooks.status.unwrap().last_handled_rotate_request.as_deref(), Some("now-1"));

    // Each algorithm's keys are what they claim.
    let aes = secrets.get("backup-key-keys").await.unwrap().data.unwrap();
    assert_eq!(aes["current.key"].0.len(), 32);
    let jwks: ConfigMap = Api::namespaced(client.clone(), ns).get("signing-jwks").await.unwrap();
    let jwks: serde_json::Value = serde_json::from_str(&jwks.data.unwrap()["jwks.json"]).unwrap();
    assert!(jwks["keys"].as_array().is_some_and(|k| !k.is_empty() && k.iter().all(|k| k["crv"] == "P-256")));

    // Nothing outside the Secrets holds any of it.
    assert!(material.len() > 20, "collected {} key forms", material.len());
    let mut haystacks: Vec<(String, String)> = vec![
        ("operator logs".into(), env.operator.logs()),
        ("operator metrics".into(), env.operator.metrics()),
        ("events".into(), serde_json::to_string(&events(client, ns).await).unwrap()),
    ];
    for (group, version, kind, namespaced) in [
        ("fhiroperator.io", "v1alpha1", "FhirEndpoint", true),
        ("fhiroperator.io", "v1alpha1", "KeyRotationSchedule", true),
        ("fhiroperator.io", "v1alpha1", "BackupPolicy", true),
        ("fhiroperator.io", "v1alpha1", "RateLimitTier", false),
        ("", "v1", "ConfigMap", true),
    ] {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> =
            if namespaced { Api::namespaced_with(client.clone(), ns, &ar) } else { Api::all_with(client.clone(), &ar) };
        let list = api.list(&ListParams::default()).await.unwrap();
        haystacks.push((kind.to_owned(), serde_json::to_string(&list.items).unwrap()));
    }
    for (what, text) in &haystacks {
        for secret in &material {
            assert!(!text.contains(secret.as_str()), "key material found in {what}");
        }
    }
}

/// The forms a key could leak in: its bytes as text (tokens, PEM lines),
/// base64 (as a Secret stores it) and hex. Short fragments are skipped: they
/// would match by chance.
fn forms_of(value: &[u8]) -> Vec<String> {
    // Serialized, a ByteString is standard base64 with padding.
    let base64 = serde_json::to_value(ByteString(value.to_vec())).unwrap().as_str().unwrap().to_owned();
    let mut forms = vec![base64, value.iter().map(|b| format!("{b:02x}")).collect()];
    if let Ok(text) = std::str::from_utf8(value) {
        forms.extend(text.lines().filter(|l| l.len() >= 32 && !l.starts_with("-----")).map(str::to_owned));
    }
    forms
}
