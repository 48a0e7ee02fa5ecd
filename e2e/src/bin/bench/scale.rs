//! Scenarios of the operator's own work at scale, without waiting for pods
//! (kube-controller-manager is stopped, so the API server serves only the
//! arms being measured): children applied against a raw client and against
//! `render | kubectl apply --server-side`, and the operator's memory.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fhir_operator::api::FhirEndpoint;
use fhir_operator::apply::Applier;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime};
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{client_for, install_crds, operator_requests};
use futures::{StreamExt, stream};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde::Deserialize;
use serde_json::json;

use crate::common::{
    apply_baseline, children_for, cpu_seconds, create_namespace, endpoint, load, proc_status_kib, reset_peak_rss,
};
use crate::stats::{join, median, secs};
use crate::track::{Targets, Tracker, targets};
use crate::{Compared, Report};

/// Children per endpoint: ServiceAccount, ConfigMap, Deployment, Service,
/// NetworkPolicy and the self-issued TLS Secret.
pub const CHILDREN: usize = 6;

pub struct Plane {
    pub plane: ControlPlane,
    pub client: Client,
}

impl Plane {
    /// A fresh control plane; without kube-controller-manager unless
    /// `controllers` (nothing here needs pods, and its ReplicaSet and Pod
    /// writes would share the two cores with the arms measured).
    pub async fn start(controllers: bool) -> Result<Self> {
        let mut plane = ControlPlane::start(None, Lifetime::Owned)?;
        if !controllers && plane.pids().iter().any(|(n, _)| n == "kube-controller-manager") {
            plane.kill("kube-controller-manager")?;
        }
        let client = client_for(plane.kubeconfig()).await?;
        install_crds(&client).await?;
        grant_rbac(&client).await?;
        Ok(Self { plane, client })
    }

    pub fn operator(&self, concurrency: usize) -> Result<Operator> {
        Operator::start(&self.plane.operator_kubeconfig(), &["--concurrency", &concurrency.to_string()])
    }

    pub fn requests(&self) -> Result<usize> {
        operator_requests(&self.plane.audit_log())
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.plane.stop();
    }
}

/// Every child of endpoints `0..n` of `ns` as the operator builds them.
pub fn all_targets(ns: &str, n: usize, with_secret: bool) -> Result<Targets> {
    let mut out = Vec::new();
    for i in 0..n {
        out.extend(targets(&children_for(&endpoint(i, ns), None, "")?, with_secret));
    }
    Ok(out)
}

pub async fn apply_endpoints(client: &Client, endpoints: Vec<FhirEndpoint>, concurrency: usize) -> Result<()> {
    let params = PatchParams::apply("bench");
    let results: Vec<Result<()>> = stream::iter(endpoints)
        .map(|ep| {
            let params = params.clone();
            let api: Api<FhirEndpoint> =
                Api::namespaced(client.clone(), ep.metadata.namespace.as_deref().unwrap_or("default"));
            async move {
                let name = ep.metadata.name.clone().unwrap_or_default();
                api.patch(&name, &params, &Patch::Apply(&ep)).await?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>().context("applying endpoints")?;
    Ok(())
}

/// Waits until the process has used less than 50 ms of CPU in a second,
/// twice in a row (reconciles and status writes done), or `timeout`.
pub async fn quiet(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut calm = 0;
    let mut last = cpu_seconds(pid);
    while Instant::now() < deadline && calm < 2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_seconds(pid);
        calm = if now - last < 0.05 { calm + 1 } else { 0 };
        last = now;
    }
}

/// One operator arm: its time to the last child, its CPU seconds and API
/// requests until it is quiet again.
pub struct OperatorArm {
    pub time: Duration,
    pub cpu: f64,
    pub requests: usize,
}

async fn operator_arm(p: &Plane, ns: &str, n: usize, concurrency: usize) -> Result<OperatorArm> {
    create_namespace(&p.client, ns).await?;
    let tracker = Tracker::start(&p.client, ns).await?;
    let want = all_targets(ns, n, true)?;
    let operator = p.operator(concurrency)?;
    quiet(operator.pid(), Duration::from_secs(120)).await;
    let (cpu0, requests0) = (cpu_seconds(operator.pid()), p.requests()?);
    let started = Instant::now();
    apply_endpoints(&p.client, (0..n).map(|i| endpoint(i, ns)).collect(), concurrency).await?;
    let last = tracker.wait("operator children", &want, timeout(n)).await?;
    quiet(operator.pid(), Duration::from_secs(120)).await;
    Ok(OperatorArm {
        time: last - started,
        cpu: cpu_seconds(operator.pid()) - cpu0,
        requests: p.requests()? - requests0,
    })
}

async fn baseline_arm(p: &Plane, ns: &str, n: usize, concurrency: usize) -> Result<Duration> {
    create_namespace(&p.client, ns).await?;
    let tracker = Tracker::start(&p.client, ns).await?;
    let want = all_targets(ns, n, true)?;
    let applier = Applier::new(p.client.clone(), "bench/baseline");
    let started = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..n)
        .map(|i| {
            let applier = applier.clone();
            async move { apply_baseline(&applier, i, ns, None).await.map(|_| ()) }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>().context("baseline apply")?;
    Ok(tracker.wait("baseline children", &want, timeout(n)).await? - started)
}

/// `fhir-operator render` of the endpoints' file, owner references taken
/// out (objects from files have no owner uid, which the API server
/// requires), piped to one `kubectl apply --server-side`. Returns (render,
/// until every child is there).
async fn render_arm(p: &Plane, ns: &str, n: usize, kubectl: &str) -> Result<(Duration, Duration)> {
    create_namespace(&p.client, ns).await?;
    let tracker = Tracker::start(&p.client, ns).await?;
    // No TLS Secret: render leaves it to the operator in the cluster.
    let want = all_targets(ns, n, false)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("endpoints.yaml");
    let mut text = String::new();
    for i in 0..n {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(&endpoint(i, ns))?);
    }
    std::fs::write(&file, text)?;
    let kubeconfig = p.plane.kubeconfig().to_owned();
    let kubectl = kubectl.to_owned();
    let started = Instant::now();
    let rendered = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let out = Command::new(fhir_operator_e2e::operator::binary())
            .args(["render", "--monitoring=false", "--pdb-api=v1beta1", "-f"])
            .arg(&file)
            .output()?;
        if !out.status.success() {
            bail!("render failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let manifests = without_owners(&String::from_utf8_lossy(&out.stdout))?;
        let rendered = started.elapsed();
        let mut child = Command::new(&kubectl)
            .args(["apply", "--server-side", "--field-manager=render", "-f", "-"])
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {kubectl}"))?;
        child.stdin.take().context("kubectl stdin")?.write_all(manifests.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(rendered)
    })
    .await??;
    let last = tracker.wait("render | kubectl children", &want, timeout(n)).await?;
    Ok((rendered, last - started))
}

/// The documents of `yaml` without `metadata.ownerReferences`.
pub fn without_owners(yaml: &str) -> Result<String> {
    let mut out = String::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let mut value = serde_json::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("ownerReferences");
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value)?);
    }
    Ok(out)
}

fn timeout(n: usize) -> Duration {
    Duration::from_secs(120 + n as u64 / 10)
}

/// Scenario 1 (and 6 with `render`): arms alternate within each repeat,
/// each in a namespace of its own on one control plane; the operator runs
/// only during its own arm.
pub async fn children(n: usize, concurrency: usize, repeats: usize, render: Option<&str>) -> Result<Vec<Report>> {
    let p = Plane::start(false).await?;
    let load_before = load();
    let (mut base, mut op, mut rend, mut rendered) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeats {
        eprintln!("bench: children {n}, repeat {}: baseline (load {})", rep + 1, load());
        base.push(baseline_arm(&p, &format!("baseline-{rep}"), n, concurrency).await?.as_secs_f64());
        eprintln!("bench: children {n}, repeat {}: operator (load {})", rep + 1, load());
        op.push(operator_arm(&p, &format!("operator-{rep}"), n, concurrency).await?);
        if let Some(kubectl) = render {
            eprintln!("bench: children {n}, repeat {}: render | kubectl (load {})", rep + 1, load());
            let (r, t) = render_arm(&p, &format!("render-{rep}"), n, kubectl).await?;
            rendered.push(r.as_secs_f64());
            rend.push(t.as_secs_f64());
        }
        eprintln!("bench:   baseline {:.2} s, operator {:.2} s", base[rep], op[rep].time.as_secs_f64());
    }
    let load_after = load();
    let op_times: Vec<f64> = op.iter().map(|a| a.time.as_secs_f64()).collect();
    let o = median(&op_times).unwrap_or(0.0);
    let cpu: Vec<f64> = op.iter().map(|a| a.cpu).collect();
    let req: Vec<f64> = op.iter().map(|a| a.requests as f64 / n as f64).collect();
    let mut children = Compared {
        scenario: "children",
        n,
        baseline_s: &base,
        operator_s: &op_times,
        requests_per_endpoint: &req,
        operator_cpu_s: &cpu,
        load: (load_before.clone(), load_after.clone()),
    }
    .report("baseline (median)", "operator (median)");
    children.row[4] = format!("{} ({CHILDREN} children)", children.row[4]);
    children.json["children"] = json!(CHILDREN);
    let mut reports = vec![children];
    if let Some(kubectl) = render {
        let r = median(&rend).unwrap_or(0.0);
        reports.push(Report {
            scenario: "render-kubectl".into(),
            header: vec![
                "endpoints",
                "operator (median)",
                "render + kubectl (median)",
                "of which render",
                "operator / render+kubectl",
                "runs",
                "kubectl",
            ],
            row: vec![
                n.to_string(),
                format!("{o:.2} s"),
                format!("{r:.2} s"),
                format!("{:.2} s", median(&rendered).unwrap_or(0.0)),
                format!("{:.2}", o / r),
                join(&rend),
                kubectl_version(kubectl),
            ],
            json: json!({"scenario": "render-kubectl", "endpoints": n, "operator_s": op_times, "render_kubectl_s": rend,
                "render_s": rendered, "ratio": o / r, "kubectl": kubectl_version(kubectl),
                "load_before": load_before, "load_after": load_after}),
        });
    }
    Ok(reports)
}

pub fn kubectl_version(kubectl: &str) -> String {
    Command::new(kubectl)
        .args(["version", "--client"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_owned()))
        .unwrap_or_else(|| format!("{kubectl}: not runnable"))
}

/// Scenario 2: RSS once the endpoints and their children exist, the peak
/// of a fresh start's initial list, and the peak of a relist forced by
/// restarting the API server.
pub async fn memory(n: usize, concurrency: usize) -> Result<Report> {
    let mut p = Plane::start(false).await?;
    let load_before = load();
    let ns = "memory";
    create_namespace(&p.client, ns).await?;
    let tracker = Tracker::start(&p.client, ns).await?;
    let want = all_targets(ns, n, true)?;
    let first = p.operator(concurrency)?;
    apply_endpoints(&p.client, (0..n).map(|i| endpoint(i, ns)).collect(), concurrency).await?;
    tracker.wait("memory children", &want, timeout(n)).await?;
    drop(tracker);
    quiet(first.pid(), Duration::from_secs(300)).await;
    let created_rss = proc_status_kib(first.pid(), "VmRSS:");
    let created_peak = proc_status_kib(first.pid(), "VmHWM:");
    drop(first);

    eprintln!("bench: memory {n}: a fresh start over {n} endpoints (load {})", load());
    let started = Instant::now();
    let operator = p.operator(concurrency)?;
    let ready = started.elapsed();
    quiet(operator.pid(), Duration::from_secs(300)).await;
    let pid = operator.pid();
    let start_peak = proc_status_kib(pid, "VmHWM:");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady = proc_status_kib(pid, "VmRSS:");

    eprintln!("bench: memory {n}: the API server restarted (load {})", load());
    let reset = reset_peak_rss(pid);
    let restarts = operator.metric("fhir_operator_watch_restarts_total");
    tokio::task::block_in_place(|| -> Result<()> {
        p.plane.kill("kube-apiserver")?;
        // The killed server's port can stay taken for a moment.
        let mut attempt = 0;
        loop {
            match p.plane.start_again("kube-apiserver") {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 10 => {
                    eprintln!("bench: the API server did not start again ({e:#}); retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while operator.metric("fhir_operator_watch_restarts_total") <= restarts && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let relisted = operator.metric("fhir_operator_watch_restarts_total") > restarts;
    quiet(pid, Duration::from_secs(300)).await;
    let relist_peak = proc_status_kib(pid, "VmHWM:");
    let after = proc_status_kib(pid, "VmRSS:");
    let load_after = load();
    let mib = |k: u64| k as f64 / 1024.0;
    Ok(Report {
        scenario: "memory".into(),
        header: vec![
            "endpoints",
            "steady RSS",
            "peak: first start + creating all",
            "peak: fresh start (initial list)",
            "peak: forced relist",
            "RSS after relist",
            "max peak / steady",
            "load before → after",
        ],
        row: vec![
            n.to_string(),
            format!("{:.1} MiB", mib(steady)),
            format!("{:.1} MiB (RSS then {:.1})", mib(created_peak), mib(created_rss)),
            format!("{:.1} MiB (ready in {})", mib(start_peak), secs(ready)),
            if reset && relisted { format!("{:.1} MiB", mib(relist_peak)) } else { "not measured".into() },
            format!("{:.1} MiB", mib(after)),
            format!("{:.2}", start_peak.max(relist_peak) as f64 / steady.max(1) as f64),
            format!("{load_before} → {load_after}"),
        ],
        json: json!({"scenario": "memory", "endpoints": n, "steady_rss_kib": steady, "created_peak_kib": created_peak,
            "created_rss_kib": created_rss, "start_peak_kib": start_peak, "start_ready_s": ready.as_secs_f64(),
            "relist_peak_kib": relist_peak, "relist_peak_reset": reset, "relisted": relisted, "rss_after_relist_kib": after,
            "controller_manager": false, "load_before": load_before, "load_after": load_after}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_references_are_taken_out_of_every_document() {
        let rendered = "# FhirEndpoint a/b\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: b\n  \
                        ownerReferences:\n  - apiVersion: fhiroperator.io/v1alpha1\n    kind: FhirEndpoint\n    \
                        name: b\n    uid: ''\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\n";
        let out = without_owners(rendered).unwrap();
        let docs: Vec<serde_json::Value> =
            serde_yaml::Deserializer::from_str(&out).map(|d| serde_json::Value::deserialize(d).unwrap()).collect();
        assert_eq!(docs.len(), 2);
        assert!(docs.iter().all(|d| d["metadata"].get("ownerReferences").is_none()));
        assert_eq!(docs[1]["kind"], "Service");
    }
}
