//! `make bench`: how the FhirEndpoint controller converges compared with a
//! baseline that does no controller work.
//!
//! For each N, on a fresh local control plane (one per N, so runs do not
//! share caches or etcd history):
//! - baseline: the same children the operator would create for N
//!   endpoints, server-side applied by this process with the same
//!   concurrency, timed until every Deployment is available;
//! - operator: N FhirEndpoints applied, timed until every one is Ready.
//!
//! In both runs a stand-in kubelet in this process marks new pods Running
//! and Ready (there is no kubelet), so both include the same controller-
//! manager work. Figures: converge time, ratio to the baseline, the
//! operator's API requests per endpoint (from the API server's audit log)
//! and its peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fhir_operator::api::{FhirEndpoint, FhirEndpointSpec};
use fhir_operator::apply::{Applier, ChildKind};
use fhir_operator::discovery::{self, PdbApi};
use fhir_operator::fhirendpoint::build::{self, Children, Images, Inputs};
use fhir_operator::fhirendpoint::{tls, validate};
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{client_for, install_crds, operator_requests, operator_writes, stand_in_kubelet};
use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::store;

#[derive(Parser)]
#[command(about = "FhirEndpoint convergence against a no-controller baseline")]
struct Args {
    /// Numbers of endpoints, one run each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    endpoints: Vec<usize>,
    /// Reconciles (operator) and appliers (baseline) in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

struct Figures {
    n: usize,
    baseline: Duration,
    converge: Duration,
    children: usize,
    requests: usize,
    writes: usize,
    peak_rss_kib: u64,
}

fn endpoint(i: usize, ns: &str) -> FhirEndpoint {
    let mut ep = FhirEndpoint::new(&format!("ep-{i:04}"), FhirEndpointSpec::default());
    ep.metadata.namespace = Some(ns.to_owned());
    ep
}

async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done().await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{what}: not done within {timeout:?}")
}

/// The children of endpoint `i`, as the operator builds them, without owner
/// references (the baseline has no owners; the garbage collector would
/// otherwise delete them), plus its TLS Secret.
fn baseline_children(i: usize, ns: &str) -> Result<(Children, k8s_openapi::api::core::v1::Secret)> {
    let ep = endpoint(i, ns);
    let v = validate::validate(&ep)?;
    let name = v.name.clone();
    let names = tls::dns_names(&name, ns);
    let (cert, key) = tls::issue(&names, k8s_openapi::jiff::Timestamp::now())?;
    let mut meta = ObjectMeta {
        name: Some(build::self_issued_tls_name(&name)),
        namespace: Some(ns.into()),
        labels: Some(build::labels(&name)),
        ..Default::default()
    };
    meta.owner_references = None;
    let secret = tls::secret(meta, cert, key);
    let inputs = Inputs {
        tier: None,
        keys: Vec::new(),
        tls_secret: build::self_issued_tls_name(&name),
        tls_fingerprint: tls::inspect(&secret)?.fingerprint,
        capabilities: discovery::Capabilities { monitoring: false, pdb: PdbApi::V1beta1 },
        images: Images::default(),
        jwks: Vec::new(),
        audit_public_key: None,
    };
    let mut children = build::build(&v, fhir_operator::meta::owner_ref(&ep), &inputs)?;
    for meta in [
        &mut children.service_account.metadata,
        &mut children.gateway_config.metadata,
        &mut children.deployment.metadata,
        &mut children.service.metadata,
        &mut children.network_policy.metadata,
    ] {
        meta.owner_references = None;
    }
    Ok((children, secret))
}

async fn apply_baseline(applier: &Applier, i: usize, ns: &str) -> Result<()> {
    let (children, secret) = baseline_children(i, ns)?;
    // No `..`: the baseline applies what the operator applies.
    let Children {
        service_account,
        gateway_config,
        deployment,
        service,
        network_policy,
        disruption_budget,
        service_monitor,
        prometheus_rule,
    } = children;
    assert!(disruption_budget.is_none() && service_monitor.is_none() && prometheus_rule.is_none());
    apply_one(applier, secret).await?;
    apply_one(applier, service_account).await?;
    apply_one(applier, gateway_config).await?;
    apply_one(applier, network_policy).await?;
    apply_one(applier, service).await?;
    apply_one(applier, deployment).await?;
    Ok(())
}

/// One server-side apply with an empty cache: always written.
async fn apply_one<K: ChildKind>(applier: &Applier, object: K) -> Result<()> {
    let (empty, _writer) = store::<K>();
    applier.ensure(&empty, object).await?;
    Ok(())
}

async fn available(client: &Client, ns: &str, n: usize) -> Result<bool> {
    let list = Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default()).await?;
    let ready =
        list.items.iter().filter(|d| d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0) >= 1).count();
    Ok(ready >= n)
}

async fn all_ready(client: &Client, ns: &str, n: usize) -> Result<bool> {
    let list = Api::<FhirEndpoint>::namespaced(client.clone(), ns).list(&ListParams::default()).await?;
    let ready = list
        .items
        .iter()
        .filter(|e| {
            e.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    Ok(ready >= n)
}

fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// A `/proc/<pid>/status` figure in KiB (`VmHWM:` peak, `VmRSS:` now).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn run_one(n: usize, concurrency: usize) -> Result<Figures> {
    let mut plane = ControlPlane::start(None, Lifetime::Owned)?;
    let client = client_for(plane.kubeconfig()).await?;
    install_crds(&client).await?;
    grant_rbac(&client).await?;
    let timeout = Duration::from_secs(60 + n as u64);

    // Baseline: the same children, no controller.
    create_namespace(&client, "baseline").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet_b = stand_in_kubelet(client.clone(), "baseline".into(), stop.clone());
    let applier = Applier::new(client.clone(), "bench/baseline");
    let started = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..n)
        .map(|i| {
            let applier = applier.clone();
            async move { apply_baseline(&applier, i, "baseline").await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>().context("baseline apply")?;
    wait_until("baseline Deployments available", timeout, async || available(&client, "baseline", n).await).await?;
    let baseline = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    kubelet_b.await?;

    // The operator.
    let operator = Operator::start(&plane.operator_kubeconfig(), &["--concurrency", &concurrency.to_string()])?;
    let before_requests = operator_requests(&plane.audit_log())?;
    let before_writes = operator_writes(&plane.audit_log())?.len();
    create_namespace(&client, "operator").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet_o = stand_in_kubelet(client.clone(), "operator".into(), stop.clone());
    let endpoints: Api<FhirEndpoint> = Api::namespaced(client.clone(), "operator");
    let params = PatchParams::apply("bench");
    let started = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..n)
        .map(|i| {
            let (endpoints, params) = (endpoints.clone(), params.clone());
            async move {
                let ep = endpoint(i, "operator");
                let name = ep.metadata.name.clone().unwrap_or_default();
                endpoints.patch(&name, &params, &Patch::Apply(&ep)).await?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>().context("applying endpoints")?;
    wait_until("every FhirEndpoint Ready", timeout, async || all_ready(&client, "operator", n).await).await?;
    let converge = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    kubelet_o.await?;
    let requests = operator_requests(&plane.audit_log())? - before_requests;
    let writes = operator_writes(&plane.audit_log())?.len() - before_writes;
    let peak_rss_kib = peak_rss_kib(operator.pid());
    eprintln!("bench: operator RSS now {} KiB, peak {peak_rss_kib} KiB", proc_status_kib(operator.pid(), "VmRSS:"));
    drop(operator);
    plane.stop();
    // SA, ConfigMap, Deployment, Service, NetworkPolicy, TLS Secret.
    Ok(Figures { n, baseline, converge, children: 6, requests, writes, peak_rss_kib })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut rows = Vec::new();
    for &n in &args.endpoints {
        eprintln!("bench: {n} endpoints, concurrency {}", args.concurrency);
        let f = runtime.block_on(run_one(n, args.concurrency))?;
        let row = format!(
            "| {} | {:.2} s | {:.2} s | {:.2} | {:.1} (writes {:.1}; children {}) | {:.1} MiB |",
            f.n,
            f.baseline.as_secs_f64(),
            f.converge.as_secs_f64(),
            f.converge.as_secs_f64() / f.baseline.as_secs_f64(),
            f.requests as f64 / f.n as f64,
            f.writes as f64 / f.n as f64,
            f.children,
            f.peak_rss_kib as f64 / 1024.0
        );
        eprintln!("{row}");
        rows.push(row);
    }
    println!("| endpoints | baseline | operator | ratio | API requests per endpoint | operator peak RSS |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}
