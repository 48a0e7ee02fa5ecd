//! The operator keeps reconciling through the faults of a real cluster, with
//! the operator process never restarted: the kube-apiserver killed (-9) and
//! started again, etcd killed and started again, and the network between
//! the operator and the API server dropping every connection and then
//! hanging (a blackhole) for 30 s. After each, a new FhirEndpoint gets all
//! its children and a child deleted by hand comes back; the times are
//! printed. `/healthz` fails during the blackhole only after the stall
//! limit, and passes again after.
//!
//! Each test runs its own control plane (it kills parts of it), so none can
//! run against an existing cluster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fhir_operator::api::FhirEndpoint;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::fault_proxy::FaultProxy;
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{client_for, install_crds, namespace, stand_in_kubelet, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::Deserialize;
use serde_json::json;

/// How long after the API server serves again every change must be
/// reconciled (the bound).
const RECOVERY: Duration = Duration::from_secs(30);
const OUTAGE: Duration = Duration::from_secs(20);

/// A control plane of the test's own, the operator behind a fault proxy.
pub struct Faulty {
    pub plane: ControlPlane,
    pub proxy: FaultProxy,
    pub client: Client,
    pub operator: Operator,
    pub ns: String,
    _dir: tempfile::TempDir,
}

impl Faulty {
    async fn start(prefix: &str, operator_args: &[&str]) -> Self {
        if std::env::var("USE_EXISTING_CLUSTER").is_ok_and(|v| v == "true") {
            eprintln!(
                "faults: USE_EXISTING_CLUSTER=true is ignored here: these tests kill and restart the API \
                 server and etcd, so they start a control plane of their own"
            );
        }
        let plane = tokio::task::spawn_blocking(|| ControlPlane::start(None, Lifetime::Owned))
            .await
            .unwrap()
            .expect("a control plane of this test");
        eprintln!("faults: control plane {}", plane.source());
        let client = client_for(plane.kubeconfig()).await.expect("client");
        install_crds(&client).await.expect("CRDs");
        grant_rbac(&client).await.expect("RBAC");
        let proxy = FaultProxy::start(([127, 0, 0, 1], plane.api_port()).into()).expect("fault proxy");
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig: PathBuf = dir.path().join("operator-via-proxy.kubeconfig");
        proxy.kubeconfig(&plane.operator_kubeconfig(), plane.api_port(), &kubeconfig).expect("kubeconfig");
        let operator = Operator::start(&kubeconfig, operator_args).expect("operator");
        let ns = namespace(&client, prefix).await.expect("namespace");
        Self { plane, proxy, client, operator, ns, _dir: dir }
    }

    /// Creates a FhirEndpoint with the defaults.
    async fn endpoint(&self, name: &str) {
        let object = json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
            "metadata": {"name": name}, "spec": {},
        });
        let api: Api<FhirEndpoint> = Api::namespaced(self.client.clone(), &self.ns);
        let params = PatchParams::apply("e2e").force();
        retry(|| async { api.patch(name, &params, &Patch::Apply(&object)).await.map(|_| ()).map_err(Into::into) })
            .await;
    }

    /// Waits until `name` has every child; returns how long that took.
    async fn children(&self, name: &str, within: Duration) -> Duration {
        let started = Instant::now();
        wait_for(&format!("every child of {name}"), within, || async {
            Ok(has_children(&self.client, &self.ns, name).await.then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; operator log:\n{}", tail(&self.operator)));
        started.elapsed()
    }

    async fn delete_network_policy(&self, name: &str) {
        let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &self.ns);
        retry(|| async { api.delete(name, &DeleteParams::default()).await.map(|_| ()).map_err(Into::into) }).await;
    }

    /// After a fault healed at `healed`: a new endpoint gets its children and
    /// the deleted NetworkPolicy of `before` comes back, both within `bound`.
    async fn converges_after(&self, what: &str, before: &str, after: &str, bound: Duration) {
        let healed = Instant::now();
        self.endpoint(after).await;
        self.delete_network_policy(before).await;
        let asked = healed.elapsed();
        let wait = bound + Duration::from_secs(30);
        let (new, drift) = tokio::join!(self.children(after, wait), self.children(before, wait));
        let (new_at, drift_at) = (asked + new, asked + drift);
        println!(
            "{what}: after the API server served again, the new endpoint had all its children in {:.1} s \
             and the deleted NetworkPolicy was back in {:.1} s",
            new_at.as_secs_f64(),
            drift_at.as_secs_f64()
        );
        assert!(new_at <= bound && drift_at <= bound, "{what}: not within {bound:?}");
    }
}

async fn retry<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    wait_for("the API server to take the request", Duration::from_secs(60), || {
        let attempt = f();
        async move { attempt.await.map(Some) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn has_children(client: &Client, ns: &str, name: &str) -> bool {
    macro_rules! exists {
        ($t:ty, $child:expr) => {
            matches!(Api::<$t>::namespaced(client.clone(), ns).get_opt(&$child).await, Ok(Some(_)))
        };
    }
    exists!(ServiceAccount, name)
        && exists!(ConfigMap, format!("{name}-gateway"))
        && exists!(Deployment, name)
        && exists!(Service, name)
        && exists!(NetworkPolicy, name)
        && exists!(Secret, format!("{name}-tls"))
}

fn tail(operator: &Operator) -> String {
    let logs = operator.logs();
    let lines: Vec<&str> = logs.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn code(operator: &Operator, path: &str) -> u16 {
    operator.get(path).map(|(code, _)| code).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_after_the_api_server_is_killed_and_started_again() {
    let mut env = Faulty::start("apiserver", &[]).await;
    env.endpoint("before").await;
    env.children("before", Duration::from_secs(60)).await;
    let restarts = env.operator.metric("fhir_operator_watch_restarts_total");

    env.plane.kill("kube-apiserver").expect("kill -9 the API server");
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| env.plane.start_again("kube-apiserver")).expect("API server back");
    env.converges_after("kube-apiserver killed for 20 s", "before", "after", RECOVERY).await;

    assert!(
        env.operator.metric("fhir_operator_watch_restarts_total") > restarts,
        "the watches restarted (fresh lists), and the metric says so"
    );
    wait_for("/healthz and /readyz 200", Duration::from_secs(30), || async {
        Ok((code(&env.operator, "/healthz") == 200 && code(&env.operator, "/readyz") == 200).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_after_etcd_is_killed_and_started_again() {
    let mut env = Faulty::start("etcd", &[]).await;
    env.endpoint("before").await;
    env.children("before", Duration::from_secs(60)).await;

    env.plane.kill("etcd").expect("kill -9 etcd");
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| env.plane.start_again("etcd")).expect("etcd back");
    // The API server stayed up; it serves again once it reaches etcd.
    let client = env.client.clone();
    wait_for("the API server to serve again", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            let version = client.apiserver_version().await;
            let list = Api::<ServiceAccount>::all(client).list(&Default::default()).await;
            Ok((version.is_ok() && list.is_ok()).then_some(()))
        }
    })
    .await
    .unwrap();
    env.converges_after("etcd killed for 20 s", "before", "after", RECOVERY).await;
}

/// The FhirEndpoint CRD deleted (with every endpoint and, through owner
/// references, their children) and created again: the watches of the kind
/// recover and a new endpoint gets its children.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_after_its_crd_is_deleted_and_created_again() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let env = Faulty::start("crd", &[]).await;
    env.endpoint("before").await;
    env.children("before", Duration::from_secs(60)).await;

    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    crds.delete("fhirendpoints.fhiroperator.io", &DeleteParams::default()).await.expect("delete the CRD");
    wait_for("the CRD gone", Duration::from_secs(60), || async {
        Ok(crds.get_opt("fhirendpoints.fhiroperator.io").await?.is_none().then_some(()))
    })
    .await
    .unwrap();
    // Blind for a while: the watches of the kind fail (404) and back off.
    tokio::time::sleep(Duration::from_secs(10)).await;
    install_crds(&env.client).await.expect("CRD created again");
    let healed = Instant::now();
    env.endpoint("after").await;
    let took = env.children("after", Duration::from_secs(60)).await;
    let at = healed.elapsed();
    println!(
        "CRD deleted and created again: the new endpoint had all its children {:.1} s after the CRD was established \
         ({:.1} s after it was created)",
        at.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(at <= RECOVERY, "not within {RECOVERY:?}");
    wait_for("/readyz 200", Duration::from_secs(30), || async {
        Ok((code(&env.operator, "/readyz") == 200).then_some(()))
    })
    .await
    .unwrap();
}

/// `/healthz` fails only once a watch has been unable to watch for longer
/// than the stall limit, and passes again after the network heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_blackhole_fails_healthz_after_the_limit_and_the_operator_recovers() {
    const LIMIT: u64 = 10;
    let env = Faulty::start("blackhole", &[&format!("--watch-stall-limit={LIMIT}s")]).await;
    env.endpoint("before").await;
    env.children("before", Duration::from_secs(60)).await;
    assert_eq!(code(&env.operator, "/healthz"), 200);

    let started = Instant::now();
    env.proxy.blackhole();
    env.proxy.drop_connections();
    let mut samples = Vec::new();
    let mut why = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        let (healthz, body) = env.operator.get("/healthz").unwrap_or_default();
        if healthz != 200 && why.is_empty() {
            why = body;
        }
        samples.push((started.elapsed(), healthz, code(&env.operator, "/readyz")));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.proxy.heal();
    let first_failure = samples.iter().find(|(_, healthz, _)| *healthz != 200).map(|(at, _, _)| *at);
    let not_ready = samples.iter().find(|(_, _, readyz)| *readyz != 200).map(|(at, _, _)| *at);
    println!(
        "blackhole: /healthz first non-200 after {:?} (limit {LIMIT} s), /readyz first non-200 after {:?}",
        first_failure.map(|d| d.as_secs_f64()),
        not_ready.map(|d| d.as_secs_f64())
    );
    let first_failure = first_failure.expect("/healthz failed during a 30 s blackhole");
    // Never before the limit; within the limit plus one watch request's
    // server timeout (5 s here) and the sampling's slack.
    assert!(first_failure >= Duration::from_secs(LIMIT), "/healthz failed before the limit: {first_failure:?}");
    assert!(first_failure <= Duration::from_secs(LIMIT + 5 + 3), "/healthz failed late: {first_failure:?}");
    assert!(not_ready.is_some(), "/readyz said ready while every watch was cut off");
    println!("blackhole: /healthz said {why:?}");
    assert!(why.contains("controller ") && why.contains("limit 10 s"), "/healthz names the watch: {why}");

    env.converges_after("blackhole of 30 s", "before", "after", Duration::from_secs(60)).await;
    wait_for("/healthz and /readyz 200 again", Duration::from_secs(60), || async {
        Ok((code(&env.operator, "/healthz") == 200 && code(&env.operator, "/readyz") == 200).then_some(()))
    })
    .await
    .unwrap();
}

/// A seeded generator for the chaos loop (xorshift64*): the seed is printed,
/// and `CHAOS_SEED` replays a run.
struct Random(u64);

impl Random {
    fn new() -> Self {
        let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
        });
        println!("chaos: seed {seed} (CHAOS_SEED={seed} replays it)");
        Self(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    fn secs(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from * 1000 + self.below((to - from) * 1000))
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    ApiServer,
    Etcd,
    Blackhole,
    DropConnections,
    KillOperator,
}

/// Ten rounds or more, each one fault at random (the API server or etcd
/// killed and started again, the network blackholed or cut, the operator
/// killed with -9) while endpoints, a tier, key schedules and a backup
/// policy are created, edited and deleted. At the end every endpoint's
/// children equal what `fhir-operator render` gives for it, no backup slot
/// has two Jobs, and the key schedule's versions are consecutive, each
/// generated once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loop_ends_with_children_as_rendered_and_no_duplicate_slot_or_key_version() {
    let origin = k8s_openapi::jiff::Timestamp::now().to_string();
    let args = [
        "--watch-stall-limit=10s".to_owned(),
        "--backup-clock-rate=60".into(),
        format!("--backup-clock-origin={origin}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut env = Faulty::start("chaos", &args).await;
    let mut random = Random::new();
    let ns = env.ns.clone();
    // Pods become ready (there is no kubelet), so rollouts finish and key
    // rotations, which wait for their consumers to roll, go on.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kubelet = stand_in_kubelet(env.client.clone(), ns.clone(), stop.clone());
    let tier = format!("{ns}-gold");
    let apply = |object: serde_json::Value| {
        let client = env.client.clone();
        let ns = ns.clone();
        async move {
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            retry(|| {
                let (client, ns, object, kind, name) =
                    (client.clone(), ns.clone(), object.clone(), kind.clone(), name.clone());
                async move {
                    dynamic(&client, &ns, &kind)
                        .patch(&name, &PatchParams::apply("e2e").force(), &Patch::Apply(&object))
                        .await
                        .map(|_| ())
                        .map_err(Into::into)
                }
            })
            .await;
        }
    };
    let credentials = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-credentials"},
                             "stringData": {"username": "fhir", "password": "chaos"}});
    apply(credentials).await;
    let tier_spec = |rps: u64| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "RateLimitTier",
                                      "metadata": {"name": tier}, "spec": {"requestsPerSecond": rps, "burst": 10}})
    };
    apply(tier_spec(50)).await;
    let api_keys = |clients: &[&str]| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
        "metadata": {"name": "api-keys"},
        "spec": {"algorithm": "api-key", "clients": clients, "interval": "6s", "gracePeriod": "2s"}})
    };
    apply(api_keys(&["a", "b"])).await;
    apply(json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule", "metadata": {"name": "backup-key"},
                 "spec": {"algorithm": "aes-256", "interval": "90d", "gracePeriod": "720h"}}))
    .await;
    let endpoint = |name: &str, replicas: u64| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": name},
        "spec": {"server": {"replicas": replicas}, "rateLimit": {"tier": tier}, "auth": {"apiKeys": ["api-keys"]},
                 "database": {"host": "db.clinical.svc", "name": "fhir", "credentialsSecret": "db-credentials"}}})
    };
    apply(endpoint("db", 1)).await;
    // Every five seconds of real time (a five-minute cron at 60 times speed).
    let policy = |schedule: &str| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "BackupPolicy",
        "metadata": {"name": "nightly"},
        "spec": {"endpoint": "db", "schedule": schedule,
                 "destination": {"persistentVolumeClaim": {"claimName": "fhir-backups"}},
                 "encryption": {"keySchedule": "backup-key"}}})
    };
    apply(policy("*/5 * * * *")).await;

    let mut endpoints: Vec<String> = vec!["db".into()];
    let mut next = 0;
    let rounds = 10;
    for round in 1..=rounds {
        // One to three changes before the fault.
        let mut changes = Vec::new();
        for _ in 0..=random.below(3) {
            match random.below(6) {
                0 | 1 => {
                    next += 1;
                    let name = format!("e{next}");
                    apply(endpoint(&name, 1 + random.below(2))).await;
                    changes.push(format!("create {name}"));
                    endpoints.push(name);
                }
                2 => {
                    let name = endpoints[random.below(endpoints.len() as u64) as usize].clone();
                    apply(endpoint(&name, 1 + random.below(3))).await;
                    changes.push(format!("edit {name}"));
                }
                3 if endpoints.len() > 1 => {
                    let name = endpoints.remove(1 + random.below(endpoints.len() as u64 - 1) as usize);
                    let api: Api<FhirEndpoint> = Api::namespaced(env.client.clone(), &ns);
                    retry(|| async {
                        api.delete(&name, &DeleteParams::default()).await.map(|_| ()).map_err(Into::into)
                    })
                    .await;
                    changes.push(format!("delete {name}"));
                }
                4 => {
                    let rps = 10 + random.below(200);
                    apply(tier_spec(rps)).await;
                    changes.push(format!("tier {rps}/s"));
                }
                _ => {
                    let clients: &[&str] = if random.below(2) == 0 { &["a", "b"] } else { &["a", "b", "c"] };
                    apply(api_keys(clients)).await;
                    apply(policy(if random.below(2) == 0 { "*/5 * * * *" } else { "*/7 * * * *" })).await;
                    changes.push(format!("key clients {clients:?}, backup schedule"));
                }
            }
        }
        let fault = [Fault::ApiServer, Fault::Etcd, Fault::Blackhole, Fault::DropConnections, Fault::KillOperator]
            [random.below(5) as usize];
        let outage = random.secs(3, 8);
        println!("chaos round {round}/{rounds}: {changes:?}, then {fault:?} for {:.1} s", outage.as_secs_f64());
        match fault {
            Fault::ApiServer | Fault::Etcd => {
                let name = if matches!(fault, Fault::ApiServer) { "kube-apiserver" } else { "etcd" };
                env.plane.kill(name).expect("kill -9");
                tokio::time::sleep(outage).await;
                tokio::task::block_in_place(|| env.plane.start_again(name)).expect("started again");
            }
            Fault::Blackhole => {
                env.proxy.blackhole();
                env.proxy.drop_connections();
                tokio::time::sleep(outage).await;
                env.proxy.heal();
            }
            Fault::DropConnections => env.proxy.drop_connections(),
            Fault::KillOperator => {
                env.operator.kill9();
                tokio::time::sleep(outage).await;
                let kubeconfig = env._dir.path().join("operator-via-proxy.kubeconfig");
                env.operator = Operator::start(&kubeconfig, &args).expect("operator started again");
            }
        }
        tokio::time::sleep(random.secs(1, 4)).await;
    }

    // Every endpoint's children as `render` gives them.
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(90) {
        last = rendered_differences(&env.client, &ns).await;
        if last.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(last.is_empty(), "children differ from `fhir-operator render` 90 s after the last fault:\n{last}");
    println!(
        "chaos: every endpoint's children equal what render gives, {:.1} s after the last fault",
        started.elapsed().as_secs_f64()
    );

    // Both schedulers go on once the faults stop: a rotation completes and a
    // backup slot gets its Job after the last fault. (How many happened
    // during the chaos depends on how long the outages were, so the test
    // asserts progress after it instead of a count during it.) The bound is
    // generous: a rotation waits for every endpoint to roll twice, on two
    // cores shared with the other tests; one CI run needed more than 90 s.
    let krs_api: Api<fhir_operator::api::KeyRotationSchedule> = Api::namespaced(env.client.clone(), &ns);
    let job_api = Api::<k8s_openapi::api::batch::v1::Job>::namespaced(env.client.clone(), &ns);
    let backup_jobs = kube::api::ListParams::default().labels("fhiroperator.io/backup-policy=nightly");
    let current_version = |krs: &fhir_operator::api::KeyRotationSchedule| {
        krs.status.as_ref().and_then(|s| s.current_version).unwrap_or_default()
    };
    let version_after_chaos = current_version(&krs_api.get("api-keys").await.unwrap());
    let jobs_after_chaos: std::collections::BTreeSet<String> =
        job_api.list(&backup_jobs).await.unwrap().items.into_iter().filter_map(|j| j.metadata.name).collect();
    let started = Instant::now();
    let (mut rotated, mut backed_up) = (None, None);
    while started.elapsed() < Duration::from_secs(180) && (rotated.is_none() || backed_up.is_none()) {
        if rotated.is_none() && current_version(&krs_api.get("api-keys").await.unwrap()) > version_after_chaos {
            rotated = Some(started.elapsed());
        }
        let names = job_api.list(&backup_jobs).await.unwrap().items;
        if backed_up.is_none()
            && names.iter().filter_map(|j| j.metadata.name.as_ref()).any(|n| !jobs_after_chaos.contains(n))
        {
            backed_up = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rotated = rotated.expect("a key rotation completes within 180 s after the last fault");
    let backed_up = backed_up.expect("a backup slot gets its Job within 180 s after the last fault");
    println!(
        "chaos: after the faults, a rotation completed in {:.1} s and a new backup Job came in {:.1} s",
        rotated.as_secs_f64(),
        backed_up.as_secs_f64()
    );

    // No backup slot with two Jobs.
    let jobs = job_api.list(&backup_jobs).await.unwrap().items;
    let mut slots = std::collections::BTreeMap::<String, Vec<String>>::new();
    for job in &jobs {
        let annotations = job.metadata.annotations.clone().unwrap_or_default();
        let slot = annotations.get("fhiroperator.io/slot").cloned().unwrap_or_default();
        let run = job
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .get("fhiroperator.io/backup-run")
            .cloned()
            .unwrap_or_default();
        slots.entry(format!("{run} {slot}")).or_default().push(job.metadata.name.clone().unwrap_or_default());
    }
    let twice: Vec<_> = slots.iter().filter(|(_, names)| names.len() > 1).collect();
    assert!(twice.is_empty(), "slots with two Jobs: {twice:?}");

    // Key versions: consecutive, none twice.
    let krs = krs_api.get("api-keys").await.unwrap();
    let mut versions: Vec<i64> = krs.status.as_ref().unwrap().versions.iter().map(|v| v.version).collect();
    versions.sort();
    let first = versions[0];
    assert_eq!(
        versions,
        (first..first + versions.len() as i64).collect::<Vec<_>>(),
        "versions consecutive, none twice"
    );
    let current = current_version(&krs);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = kubelet.await;
    println!(
        "chaos: {} backup Jobs in {} distinct slots; key versions {versions:?}, current {current}",
        jobs.len(),
        slots.len()
    );
    let logs = env.operator.logs();
    assert!(!logs.contains("panicked"), "the operator panicked:\n{logs}");
}

fn dynamic(client: &Client, ns: &str, kind: &str) -> Api<kube::api::DynamicObject> {
    use kube::core::{ApiResource, GroupVersionKind};
    let gvk = match kind {
        "Secret" => GroupVersionKind::gvk("", "v1", "Secret"),
        other => GroupVersionKind::gvk("fhiroperator.io", "v1alpha1", other),
    };
    let ar = ApiResource::from_gvk(&gvk);
    if kind == "RateLimitTier" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    }
}

/// What differs between the cluster and `fhir-operator render` of every
/// endpoint in `ns` (empty when nothing): each rendered field must be in
/// the live object with the same value. Left out: the owner's uid (render
/// has none) and the self-issued certificate's hash (render issues none).
/// The key versions in force come from the schedules' status, as exported.
async fn rendered_differences(client: &Client, ns: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut inputs = Vec::new();
    let strip = |mut v: serde_json::Value| {
        if let Some(meta) = v["metadata"].as_object_mut() {
            for key in ["managedFields", "resourceVersion", "uid", "creationTimestamp", "generation"] {
                meta.remove(key);
            }
        }
        v
    };
    let Ok(endpoints) = Api::<FhirEndpoint>::namespaced(client.clone(), ns).list(&Default::default()).await else {
        return "listing endpoints failed".into();
    };
    for ep in &endpoints.items {
        inputs.push(strip(serde_json::to_value(ep).unwrap()));
    }
    for kind in ["RateLimitTier", "KeyRotationSchedule"] {
        let Ok(list) = dynamic(client, ns, kind).list(&Default::default()).await else {
            return format!("listing {kind}");
        };
        for mut obj in list.items {
            obj.types =
                Some(kube::core::TypeMeta { api_version: "fhiroperator.io/v1alpha1".into(), kind: kind.into() });
            inputs.push(strip(serde_json::to_value(&obj).unwrap()));
        }
    }
    let file = dir.path().join("cluster.yaml");
    let docs: Vec<String> = inputs.iter().map(|v| serde_yaml::to_string(v).unwrap()).collect();
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let out = std::process::Command::new(fhir_operator_e2e::operator::binary())
        .args(["render", "--monitoring=false", "--pdb-api=v1beta1", "-n", ns, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    if !out.status.success() {
        return format!("render failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut differences = String::new();
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let Ok(rendered) = serde_json::Value::deserialize(doc) else { continue };
        if rendered.is_null() {
            continue;
        }
        let (api_version, kind) =
            (rendered["apiVersion"].as_str().unwrap_or_default(), rendered["kind"].as_str().unwrap_or_default());
        let name = rendered["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(group, version, kind));
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let live = match api.get_opt(&name).await {
            Ok(Some(obj)) => serde_json::to_value(obj).unwrap(),
            Ok(None) => {
                differences.push_str(&format!("{kind}/{name}: missing\n"));
                continue;
            }
            Err(e) => return format!("{kind}/{name}: {e}"),
        };
        subset(&rendered, &live, &format!("{kind}/{name}"), &mut differences);
    }
    differences
}

fn subset(rendered: &serde_json::Value, live: &serde_json::Value, path: &str, out: &mut String) {
    use serde_json::Value;
    const SKIP: [&str; 2] = ["uid", "fhiroperator.io/tls-hash"];
    match (rendered, live) {
        (Value::Object(r), Value::Object(l)) => {
            for (key, value) in r {
                // The API server stores no zero values (`false`, `0`) of
                // fields that Go omits when empty.
                let zero = *value == Value::Bool(false) || *value == json!(0);
                if SKIP.contains(&key.as_str()) || value.is_null() || (zero && !l.contains_key(key)) {
                    continue;
                }
                match l.get(key) {
                    Some(live) => subset(value, live, &format!("{path}.{key}"), out),
                    None => out.push_str(&format!("{path}.{key}: not in the cluster\n")),
                }
            }
        }
        (Value::Array(r), Value::Array(l)) if r.len() == l.len() => {
            for (i, (a, b)) in r.iter().zip(l).enumerate() {
                subset(a, b, &format!("{path}[{i}]"), out);
            }
        }
        (r, l) if r == l => {}
        (r, l) => {
            let show = |v: &Value| {
                let s = v.to_string();
                if s.len() > 120 { format!("{}…", &s[..120]) } else { s }
            };
            out.push_str(&format!("{path}: rendered {} but the cluster has {}\n", show(r), show(l)));
        }
    }
}
