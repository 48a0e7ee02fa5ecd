//! What the scenarios share: the endpoints, the baseline's children, the
//! operator process's figures from `/proc`.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fhir_operator::api::{FhirEndpoint, FhirEndpointSpec, RateLimitTierSpec};
use fhir_operator::apply::{Applier, ChildKind};
use fhir_operator::discovery::{self, PdbApi};
use fhir_operator::fhirendpoint::build::{self, Children, Images, Inputs};
use fhir_operator::fhirendpoint::{tls, validate};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::reflector::store;

use crate::stats;

pub fn endpoint(i: usize, ns: &str) -> FhirEndpoint {
    endpoint_with(i, ns, FhirEndpointSpec::default())
}

pub fn endpoint_with(i: usize, ns: &str, spec: FhirEndpointSpec) -> FhirEndpoint {
    let mut ep = FhirEndpoint::new(&format!("ep-{i:05}"), spec);
    ep.metadata.namespace = Some(ns.to_owned());
    ep
}

pub async fn create_namespace(client: &Client, name: &str) -> Result<()> {
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    Ok(())
}

pub async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done().await.unwrap_or(false) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{what}: not done within {timeout:?}")
}

/// The children the operator builds for `ep` on this control plane
/// (v1.20: PodDisruptionBudget v1beta1, no monitoring API; default images),
/// with the endpoint as owner. `tls_fingerprint` only reaches a pod-template
/// annotation, which the trackers leave out of their comparison.
pub fn children_for(ep: &FhirEndpoint, tier: Option<RateLimitTierSpec>, tls_fingerprint: &str) -> Result<Children> {
    let v = validate::validate(ep)?;
    let inputs = Inputs {
        tier,
        keys: Vec::new(),
        tls_secret: build::self_issued_tls_name(&v.name),
        tls_fingerprint: tls_fingerprint.to_owned(),
        capabilities: discovery::Capabilities { monitoring: false, pdb: PdbApi::V1beta1 },
        images: Images::default(),
        jwks: Vec::new(),
        audit_public_key: None,
        key_hints: None,
    };
    Ok(build::build(&v, fhir_operator::meta::owner_ref(ep), &inputs)?)
}

/// `children_for` without owner references: the baseline has no owners
/// (the garbage collector would otherwise delete its children).
pub fn unowned(mut children: Children) -> Children {
    for meta in [
        &mut children.service_account.metadata,
        &mut children.gateway_config.metadata,
        &mut children.deployment.metadata,
        &mut children.service.metadata,
        &mut children.network_policy.metadata,
    ] {
        meta.owner_references = None;
    }
    children
}

/// The children of endpoint `i` as the operator builds them, unowned,
/// plus its TLS Secret, issued here as the operator issues one.
pub fn baseline_children(i: usize, ns: &str, tier: Option<RateLimitTierSpec>) -> Result<(Children, Secret, String)> {
    let ep = endpoint(i, ns);
    let name = ep.metadata.name.clone().unwrap_or_default();
    let names = tls::dns_names(&name, ns);
    let (cert, key) = tls::issue(&names, k8s_openapi::jiff::Timestamp::now())?;
    let meta = ObjectMeta {
        name: Some(build::self_issued_tls_name(&name)),
        namespace: Some(ns.into()),
        labels: Some(build::labels(&name)),
        ..Default::default()
    };
    let secret = tls::secret(meta, cert, key);
    let fingerprint = tls::inspect(&secret)?.fingerprint;
    let children = unowned(children_for(&ep, tier, &fingerprint)?);
    Ok((children, secret, fingerprint))
}

/// Applies endpoint `i`'s children as the baseline; returns its TLS
/// certificate's fingerprint.
pub async fn apply_baseline(applier: &Applier, i: usize, ns: &str, tier: Option<RateLimitTierSpec>) -> Result<String> {
    let (children, secret, fingerprint) = baseline_children(i, ns, tier)?;
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
    Ok(fingerprint)
}

/// One server-side apply with an empty cache: always written.
pub async fn apply_one<K: ChildKind>(applier: &Applier, object: K) -> Result<()> {
    let (empty, _writer) = store::<K>();
    applier.ensure(&empty, object).await?;
    Ok(())
}

/// A `/proc/<pid>/status` figure in KiB, 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    stats::status_kib(&status, field).unwrap_or(0)
}

/// The process's user plus system CPU time so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    stats::cpu_ticks(&stat).unwrap_or(0) as f64 / hz
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS, so that a
/// later `VmHWM` is the peak of what came after. False where the kernel
/// refuses it.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// The machine's load averages now.
pub fn load() -> String {
    stats::load_averages(&std::fs::read_to_string("/proc/loadavg").unwrap_or_default())
}
