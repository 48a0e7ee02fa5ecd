//! The `ready` scenario (`make bench`): N endpoints until every one is
//! Ready, against a baseline that applies the same children and waits until
//! every Deployment is available. Both include kube-controller-manager and
//! the stand-in kubelet.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fhir_operator::api::FhirEndpoint;
use fhir_operator::apply::Applier;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{client_for, install_crds, operator_requests, operator_writes, stand_in_kubelet};
use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::common::{apply_baseline, create_namespace, endpoint, proc_status_kib, wait_until};

pub struct Figures {
    pub n: usize,
    pub baseline: Duration,
    pub converge: Duration,
    pub children: usize,
    pub requests: usize,
    pub writes: usize,
    pub peak_rss_kib: u64,
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

pub async fn run_one(n: usize, concurrency: usize) -> Result<Figures> {
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
            async move { apply_baseline(&applier, i, "baseline", None).await.map(|_| ()) }
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

pub fn report(f: &Figures) -> crate::Report {
    crate::Report {
        scenario: "ready".into(),
        header: vec!["endpoints", "baseline", "operator", "ratio", "API requests per endpoint", "operator peak RSS"],
        row: vec![
            f.n.to_string(),
            format!("{:.2} s", f.baseline.as_secs_f64()),
            format!("{:.2} s", f.converge.as_secs_f64()),
            format!("{:.2}", f.converge.as_secs_f64() / f.baseline.as_secs_f64()),
            format!(
                "{:.1} (writes {:.1}; children {})",
                f.requests as f64 / f.n as f64,
                f.writes as f64 / f.n as f64,
                f.children
            ),
            format!("{:.1} MiB", f.peak_rss_kib as f64 / 1024.0),
        ],
        json: serde_json::json!({"scenario": "ready", "endpoints": f.n, "baseline_s": f.baseline.as_secs_f64(),
            "operator_s": f.converge.as_secs_f64(), "requests": f.requests, "writes": f.writes,
            "children": f.children, "peak_rss_kib": f.peak_rss_kib}),
    }
}
