//! Scenarios of one change reaching many endpoints (a tier edit, a key
//! rotation) and of single edits under background churn.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fhir_operator::api::{
    FhirEndpoint, FhirEndpointSpec, KeyRotationSchedule, RateLimitTier, RateLimitTierSpec, RotationPhase,
};
use fhir_operator::apply::Applier;
use fhir_operator::fhirendpoint::build::KEYS_HASH_ANNOTATION;
use fhir_operator::keyrotation::rotation::ROTATE_ANNOTATION;
use fhir_operator_e2e::stand_in_kubelet;
use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::EnvVar;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::common::{
    apply_baseline, apply_one, children_for, cpu_seconds, create_namespace, endpoint_with, load, unowned,
};
use crate::scale::{Plane, apply_endpoints, quiet};
use crate::stats::{percentile, secs};
use crate::track::{Targets, Tracker, config_targets, deployment_signature, targets};
use crate::{Compared, Report};

const TIER: &str = "bench";

fn tier_spec(rps: i32) -> Result<RateLimitTierSpec> {
    Ok(serde_json::from_value(json!({"requestsPerSecond": rps}))?)
}

fn tiered(i: usize, ns: &str) -> Result<FhirEndpoint> {
    Ok(endpoint_with(i, ns, serde_json::from_value(json!({"rateLimit": {"tier": TIER}}))?))
}

fn tier_targets(ns: &str, n: usize, rps: i32, all: bool) -> Result<Targets> {
    let mut out = Vec::new();
    for i in 0..n {
        let children = children_for(&tiered(i, ns)?, Some(tier_spec(rps)?), "")?;
        out.extend(if all { targets(&children, true) } else { config_targets(&children) });
    }
    Ok(out)
}

/// Scenario 3: `n` endpoints on one tier; each repeat edits the tier
/// (operator) and, alternately, patches the same ConfigMaps and Deployments
/// of as many unowned copies (baseline).
pub async fn tier(n: usize, concurrency: usize, repeats: usize) -> Result<Report> {
    let p = Plane::start(false).await?;
    let tiers: Api<RateLimitTier> = Api::all(p.client.clone());
    let apply_tier = async |rps: i32| -> Result<()> {
        let tier = json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "RateLimitTier",
            "metadata": {"name": TIER}, "spec": {"requestsPerSecond": rps}});
        tiers.patch(TIER, &PatchParams::apply("bench").force(), &Patch::Apply(tier)).await?;
        Ok(())
    };
    apply_tier(10).await?;
    let (b_ns, o_ns) = ("baseline", "operator");
    for ns in [b_ns, o_ns] {
        create_namespace(&p.client, ns).await?;
    }
    let (b_track, o_track) = (Tracker::start(&p.client, b_ns).await?, Tracker::start(&p.client, o_ns).await?);
    let applier = Applier::new(p.client.clone(), "bench/baseline");
    let fingerprints: Vec<String> = stream::iter(0..n)
        .map(|i| {
            let applier = applier.clone();
            async move { apply_baseline(&applier, i, b_ns, Some(tier_spec(10)?)).await }
        })
        .buffered(concurrency)
        .collect::<Vec<Result<String>>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    b_track.wait("baseline children", &tier_targets(b_ns, n, 10, true)?, Duration::from_secs(600)).await?;
    let operator = p.operator(concurrency)?;
    apply_endpoints(&p.client, (0..n).map(|i| tiered(i, o_ns)).collect::<Result<_>>()?, concurrency).await?;
    o_track.wait("operator children", &tier_targets(o_ns, n, 10, true)?, Duration::from_secs(600)).await?;
    quiet(operator.pid(), Duration::from_secs(300)).await;

    let load_before = load();
    let (mut base, mut op, mut cpu, mut req) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for rep in 0..repeats {
        let rps = 20 + 10 * rep as i32;
        eprintln!("bench: tier {n}, repeat {}: baseline (load {})", rep + 1, load());
        let want = tier_targets(b_ns, n, rps, false)?;
        let started = Instant::now();
        let results: Vec<Result<()>> = stream::iter(0..n)
            .map(|i| {
                let (applier, fingerprint) = (applier.clone(), fingerprints[i].clone());
                async move {
                    let children = unowned(children_for(&tiered(i, b_ns)?, Some(tier_spec(rps)?), &fingerprint)?);
                    apply_one(&applier, children.gateway_config).await?;
                    apply_one(&applier, children.deployment).await
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>>>().context("baseline patches")?;
        base.push(
            (b_track.wait("baseline tier patches", &want, Duration::from_secs(600)).await? - started).as_secs_f64(),
        );

        eprintln!("bench: tier {n}, repeat {}: operator (load {})", rep + 1, load());
        let want = tier_targets(o_ns, n, rps, false)?;
        let (cpu0, req0) = (cpu_seconds(operator.pid()), p.requests()?);
        let started = Instant::now();
        apply_tier(rps).await?;
        op.push((o_track.wait("tier fan-out", &want, Duration::from_secs(600)).await? - started).as_secs_f64());
        quiet(operator.pid(), Duration::from_secs(300)).await;
        cpu.push(cpu_seconds(operator.pid()) - cpu0);
        req.push((p.requests()? - req0) as f64 / n as f64);
        eprintln!("bench:   baseline {:.2} s, operator {:.2} s", base[rep], op[rep]);
    }
    let load_after = load();
    Ok(Compared {
        scenario: "tier-fanout",
        n,
        baseline_s: &base,
        operator_s: &op,
        requests_per_endpoint: &req,
        operator_cpu_s: &cpu,
        load: (load_before, load_after),
    }
    .report("baseline: 2 patches each (median)", "operator: one tier edit (median)"))
}

/// Whether every Deployment of `ns` has rolled out its latest template.
async fn rolled_out(api: &Api<Deployment>, n: usize) -> Result<bool> {
    let list = api.list(&ListParams::default()).await?;
    let done = list
        .items
        .iter()
        .filter(|d| {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            d.status.as_ref().is_some_and(|s| {
                s.observed_generation >= d.metadata.generation
                    && s.updated_replicas == Some(want)
                    && s.available_replicas == Some(want)
                    && s.replicas == Some(want)
            })
        })
        .count();
    Ok(done >= n)
}

async fn wait_rolled_out(api: &Api<Deployment>, n: usize) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while Instant::now() < deadline {
        if rolled_out(api, n).await.unwrap_or(false) {
            return Ok(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("Deployments not rolled out within 30 min")
}

/// Scenario 4: `n` endpoints on one api-key schedule; one rotation asked
/// for by annotation, timed per phase from the schedule's status. Then,
/// with the operator stopped, the baseline rolls the same Deployments the
/// same way: a pod-template annotation patched, rolled out, the grace
/// period, patched again, rolled out. kube-controller-manager runs here
/// and the stand-in kubelet makes the pods ready.
pub async fn keys(n: usize, concurrency: usize, grace: Duration) -> Result<Report> {
    let p = Plane::start(true).await?;
    let ns = "keys";
    create_namespace(&p.client, ns).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let kubelet = stand_in_kubelet(p.client.clone(), ns.into(), stop.clone());
    let schedules: Api<KeyRotationSchedule> = Api::namespaced(p.client.clone(), ns);
    let schedule = json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
        "metadata": {"name": "bench-keys", "namespace": ns},
        "spec": {"algorithm": "api-key", "clients": ["bench"], "interval": "720h", "gracePeriod": humantime::format_duration(grace).to_string()}});
    schedules.patch("bench-keys", &PatchParams::apply("bench"), &Patch::Apply(schedule)).await?;
    let operator = p.operator(concurrency)?;
    let spec: FhirEndpointSpec = serde_json::from_value(json!({"auth": {"apiKeys": ["bench-keys"]}}))?;
    apply_endpoints(&p.client, (0..n).map(|i| endpoint_with(i, ns, spec.clone())).collect(), concurrency).await?;
    let deployments: Api<Deployment> = Api::namespaced(p.client.clone(), ns);
    eprintln!("bench: keys {n}: waiting for the first rollout (load {})", load());
    wait_rolled_out(&deployments, n).await?;
    let status = async || -> Result<(i64, Option<RotationPhase>)> {
        let s = schedules.get("bench-keys").await?.status.unwrap_or_default();
        Ok((s.current_version.unwrap_or(0), s.rotation.map(|r| r.phase)))
    };
    crate::common::wait_until("schedule at version 1, no rotation", Duration::from_secs(300), async || {
        Ok(status().await?.0 >= 1 && status().await?.1.is_none())
    })
    .await?;
    quiet(operator.pid(), Duration::from_secs(300)).await;

    let load_before = load();
    eprintln!("bench: keys {n}: rotation (load {load_before})");
    let (version, _) = status().await?;
    let (cpu0, req0) = (cpu_seconds(operator.pid()), p.requests()?);
    let started = Instant::now();
    let patch = json!({"metadata": {"annotations": {ROTATE_ANNOTATION: "bench-1"}}});
    schedules.patch("bench-keys", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let mut seen: Vec<(Option<RotationPhase>, Duration)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        // A busy API server fails a read now and then (etcd "transport is
        // closing"): read again, as the operator's own watches do.
        let (v, phase) = match status().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bench: reading the schedule: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if seen.last().map(|(p, _)| *p) != Some(phase) && (phase.is_some() || v > version) {
            eprintln!("bench: keys {n}: {phase:?} after {}", secs(started.elapsed()));
            seen.push((phase, started.elapsed()));
        }
        if v > version && phase.is_none() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the rotation did not finish within an hour: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = started.elapsed();
    quiet(operator.pid(), Duration::from_secs(300)).await;
    let (cpu, requests) = (cpu_seconds(operator.pid()) - cpu0, p.requests()? - req0);
    drop(operator);

    eprintln!("bench: keys {n}: baseline rolls (load {})", load());
    let roll = async |value: &str| -> Result<Duration> {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {KEYS_HASH_ANNOTATION: value}}}}});
        let started = Instant::now();
        let names: Vec<String> =
            deployments.list(&ListParams::default()).await?.items.into_iter().filter_map(|d| d.metadata.name).collect();
        let results: Vec<Result<()>> = stream::iter(names)
            .map(|name| {
                let (deployments, patch) = (deployments.clone(), patch.clone());
                async move {
                    let params = PatchParams::default();
                    if deployments.patch(&name, &params, &Patch::Merge(&patch)).await.is_err() {
                        deployments.patch(&name, &params, &Patch::Merge(&patch)).await?;
                    }
                    Ok(())
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(wait_rolled_out(&deployments, n).await? - started)
    };
    let roll1 = roll("bench-roll-1").await?;
    tokio::time::sleep(grace).await;
    let roll2 = roll("bench-roll-2").await?;
    let baseline = roll1 + grace + roll2;
    stop.store(true, Ordering::Relaxed);
    kubelet.await?;
    let load_after = load();
    let phases: Vec<String> = seen
        .iter()
        .map(|(p, t)| format!("{} at {}", p.map(|p| format!("{p:?}")).unwrap_or("done".into()), secs(*t)))
        .collect();
    Ok(Report {
        scenario: "key-fanout".into(),
        header: vec![
            "endpoints",
            "baseline: roll, grace, roll",
            "operator: one rotation",
            "ratio",
            "operator phases (from the request)",
            "requests/endpoint",
            "operator CPU",
            "load before → after",
        ],
        row: vec![
            n.to_string(),
            format!("{} ({} + {} + {})", secs(baseline), secs(roll1), secs(grace), secs(roll2)),
            secs(total),
            format!("{:.2}", total.as_secs_f64() / baseline.as_secs_f64()),
            phases.join("; "),
            format!("{:.1}", requests as f64 / n as f64),
            format!("{cpu:.1} s"),
            format!("{load_before} → {load_after}"),
        ],
        json: json!({"scenario": "key-fanout", "endpoints": n, "grace_s": grace.as_secs_f64(), "operator_s": total.as_secs_f64(),
            "phases": seen.iter().map(|(p, t)| json!({"phase": p.map(|p| format!("{p:?}")), "at_s": t.as_secs_f64()})).collect::<Vec<_>>(),
            "baseline_s": baseline.as_secs_f64(), "baseline_roll_s": [roll1.as_secs_f64(), roll2.as_secs_f64()],
            "ratio": total.as_secs_f64() / baseline.as_secs_f64(), "requests_per_endpoint": requests as f64 / n as f64,
            "operator_cpu_s": cpu, "controller_manager": true, "load_before": load_before, "load_after": load_after}),
    })
}

fn with_env(name: &str, value: String) -> Result<FhirEndpointSpec> {
    let mut spec = FhirEndpointSpec::default();
    spec.server.env = vec![EnvVar { name: name.into(), value: Some(value), ..Default::default() }];
    Ok(spec)
}

/// Scenario 5: `edits` single-endpoint edits spread over `window` among
/// `n` endpoints, while `n` other endpoints are edited at an even pace
/// over the same window; latency from each edit to its Deployment updated.
pub async fn edits(n: usize, concurrency: usize, edits: usize, window: Duration) -> Result<Report> {
    let p = Plane::start(false).await?;
    let (e_ns, c_ns) = ("edit", "churn");
    for ns in [e_ns, c_ns] {
        create_namespace(&p.client, ns).await?;
    }
    let (e_track, c_track) = (Tracker::start(&p.client, e_ns).await?, Tracker::start(&p.client, c_ns).await?);
    let operator = p.operator(concurrency)?;
    for (ns, track) in [(e_ns, &e_track), (c_ns, &c_track)] {
        apply_endpoints(&p.client, (0..n).map(|i| crate::common::endpoint(i, ns)).collect(), concurrency).await?;
        track.wait("children", &crate::scale::all_targets(ns, n, true)?, Duration::from_secs(600)).await?;
    }
    quiet(operator.pid(), Duration::from_secs(300)).await;
    let load_before = load();
    eprintln!("bench: edits {n}: {edits} edits and {n} churning endpoints over {window:?} (load {load_before})");
    let (cpu0, req0) = (cpu_seconds(operator.pid()), p.requests()?);
    let started = Instant::now();
    let client = p.client.clone();
    let churn = tokio::spawn(async move {
        let api: Api<FhirEndpoint> = Api::namespaced(client, c_ns);
        let params = PatchParams::apply("bench");
        for i in 0..n {
            tokio::time::sleep_until((started + window.mul_f64(i as f64 / n as f64)).into()).await;
            let ep = endpoint_with(i, c_ns, with_env("CHURN", "1".into())?);
            api.patch(&ep.metadata.name.clone().unwrap_or_default(), &params, &Patch::Apply(&ep)).await?;
        }
        anyhow::Ok(())
    });
    let api: Api<FhirEndpoint> = Api::namespaced(p.client.clone(), e_ns);
    let params = PatchParams::apply("bench");
    let mut sent = Vec::new();
    let stride = (n / edits.max(1)).max(1);
    for k in 0..edits {
        tokio::time::sleep_until((started + window.mul_f64(k as f64 / edits as f64)).into()).await;
        let i = (k * stride) % n;
        let ep = endpoint_with(i, e_ns, with_env("BENCH_EDIT", k.to_string())?);
        let want = deployment_signature(&children_for(&ep, None, "")?.deployment);
        let at = Instant::now();
        api.patch(&ep.metadata.name.clone().unwrap_or_default(), &params, &Patch::Apply(&ep)).await?;
        sent.push((("Deployment", ep.metadata.name.clone().unwrap_or_default()), want, at));
    }
    churn.await??;
    let want: Targets = sent.iter().map(|(k, w, _)| (k.clone(), Some(w.clone()))).collect();
    e_track.wait("edited Deployments", &want, Duration::from_secs(120)).await?;
    let latencies: Vec<Duration> = sent
        .iter()
        .map(|(key, _, at)| e_track.get(key).map(|s| s.at.saturating_duration_since(*at)).unwrap_or_default())
        .collect();
    quiet(operator.pid(), Duration::from_secs(120)).await;
    let (cpu, requests) = (cpu_seconds(operator.pid()) - cpu0, p.requests()? - req0);
    let load_after = load();
    let (p50, p99, max) = (
        percentile(&latencies, 50.0).unwrap_or_default(),
        percentile(&latencies, 99.0).unwrap_or_default(),
        percentile(&latencies, 100.0).unwrap_or_default(),
    );
    Ok(Report {
        scenario: "edit-latency".into(),
        header: vec![
            "endpoints (+ churning)",
            "edits over",
            "p50",
            "p99",
            "max",
            "operator CPU",
            "requests",
            "load before → after",
        ],
        row: vec![
            format!("{n} (+ {n})"),
            format!("{edits} over {}", secs(window)),
            format!("{:.3} s", p50.as_secs_f64()),
            format!("{:.3} s", p99.as_secs_f64()),
            format!("{:.3} s", max.as_secs_f64()),
            format!("{cpu:.1} s"),
            requests.to_string(),
            format!("{load_before} → {load_after}"),
        ],
        json: json!({"scenario": "edit-latency", "endpoints": n, "churning": n, "edits": edits, "window_s": window.as_secs_f64(),
            "p50_s": p50.as_secs_f64(), "p99_s": p99.as_secs_f64(), "max_s": max.as_secs_f64(),
            "operator_cpu_s": cpu, "requests": requests, "controller_manager": false,
            "load_before": load_before, "load_after": load_after}),
    })
}
