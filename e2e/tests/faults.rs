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
use fhir_operator_e2e::{client_for, install_crds, namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
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
