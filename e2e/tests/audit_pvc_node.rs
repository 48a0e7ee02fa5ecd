//! `spec.audit` with a PersistentVolumeClaim, on the local node (kubelet +
//! dockershim): a static hostPath PersistentVolume bound to the claim; the
//! endpoint's own pod mounts it and its audit sidecar writes its stream;
//! the project's audit writer (`fhir-operator audit-sidecar`) runs on the
//! host with the endpoint's key and writes a second stream of known records
//! into the same directory. The operator cannot mount the claim: it runs
//! its verification Job on the node every `sealEvery` (the claim mounted
//! read-only, its own image), reads the Job's termination message, and
//! `auditLog` turns Pass; one byte of a sealed record changed on the volume
//! turns it Fail naming the segment and record.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fhir_operator::api::{ComplianceStatus, FhirEndpoint};
use fhir_operator::audit::summary::{Outcome, Summary};
use fhir_operator::fhirendpoint::audit::signing_key_secret;
use fhir_operator::fhirendpoint::audit_job::{VERIFY_CONTAINER, VERIFY_LABEL};
use fhir_operator::fhirendpoint::pod::RUN_AS;
use fhir_operator_e2e::control_plane::{ControlPlane, Lifetime, OwnedProcess};
use fhir_operator_e2e::operator::{self, Operator, grant_rbac};
use fhir_operator_e2e::postgres::free_port;
use fhir_operator_e2e::{apply_value, audit_log_entry, client_for, install_crds, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret, ServiceAccount};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

const NS: &str = "audit-pvc";
const CLAIM: &str = "patients-audit";
const WRITER_STREAM: &str = "host-writer";
/// Jobs every 20 s: pods start in a few seconds on the node.
const SEAL_EVERY: &str = "20s";
const RECORDS: usize = 30;
const WAIT: Duration = Duration::from_secs(240);

/// The state of everything involved, for a failure message.
async fn diagnose(client: &kube::Client, operator: &Operator, writer: &OwnedProcess) -> String {
    let mut out = String::new();
    let endpoints: Api<FhirEndpoint> = Api::namespaced(client.clone(), NS);
    if let Ok(ep) = endpoints.get("patients").await {
        out += &format!("status: {}\n", serde_json::to_string_pretty(&ep.status).unwrap_or_default());
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    for job in jobs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        out += &format!("job {:?}: {}\n", job.metadata.name, serde_json::to_string(&job.status).unwrap_or_default());
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for pod in pods.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
        out += &format!("pod {:?}: {}\n", pod.metadata.name, serde_json::to_string(&pod.status).unwrap_or_default());
    }
    let tail =
        |text: String| text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    out + &format!("--- writer:\n{}\n--- operator:\n{}", tail(writer.log()), tail(operator.logs()))
}

/// Appends access-log lines as nginx writes them.
fn append_requests(log: &Path, n: usize) {
    let mut file = std::fs::OpenOptions::new().append(true).open(log).expect("access log");
    for i in 0..n {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        writeln!(
            file,
            r#"{{"time":"{time}","client":"reader","method":"GET","path":"/fhir/Patient/canary-patient-{i}","status":200}}"#
        )
        .expect("append");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_verifies_a_claim_with_a_job_on_the_node_and_catches_tampering() {
    // The shared build directory may hold another checkout's binary: this
    // test needs the one that writes a summary.
    let help = Command::new(operator::binary()).args(["audit", "verify", "--help"]).output().expect("operator binary");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--summary"),
        "{} is not this checkout's build (no `audit verify --summary`): rebuild it",
        operator::binary().display()
    );
    let t0 = Instant::now();
    let plane = ControlPlane::start_with_node(None, Lifetime::Owned).expect("control plane with a node");
    let node = plane.node().expect("a node").clone();
    let client = client_for(plane.kubeconfig()).await.expect("client");
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let args = node.images.operator_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = Operator::start(&plane.operator_kubeconfig(), &args).expect("operator");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap())
        .await
        .expect("namespace");
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    wait_for("the default service account", Duration::from_secs(30), || {
        let sa = service_accounts.clone();
        async move { Ok(sa.get_opt("default").await?) }
    })
    .await
    .expect("service account");
    eprintln!("control plane, node and operator up in {:?}", t0.elapsed());

    // -- The volume: a host directory the sidecar's uid may write, a static
    // PersistentVolume bound to the claim.
    let dir = tempfile::Builder::new().prefix("fhir-audit-pvc-").tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let trail = d.join("trail");
    std::fs::create_dir(&trail).expect("trail dir");
    std::os::unix::fs::chown(&trail, Some(RUN_AS as u32), Some(RUN_AS as u32)).expect("chown");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = serde_json::from_value(json!({
        "metadata": {"name": "audit-pvc-trail"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": trail.to_str().expect("UTF-8"), "type": "Directory"},
                 "claimRef": {"namespace": NS, "name": CLAIM}}
    }))
    .unwrap();
    volumes.create(&PostParams::default(), &volume).await.expect("PersistentVolume");
    apply_value(
        &client,
        NS,
        &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": "audit-pvc-trail",
                     "resources": {"requests": {"storage": "1Gi"}}}}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    wait_for("the claim Bound", Duration::from_secs(60), || {
        let claims = claims.clone();
        async move { Ok(claims.get(CLAIM).await?.status.and_then(|s| s.phase).filter(|p| p == "Bound")) }
    })
    .await
    .expect("claim bound");

    // -- The endpoint, its trail on the claim.
    apply_value(
        &client,
        NS,
        &json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
            "metadata": {"name": "clients"},
            "spec": {"algorithm": "api-key", "clients": ["reader"], "interval": "720h"}}),
    )
    .await;
    apply_value(
        &client,
        NS,
        &json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": "patients"},
            "spec": {
                "server": {"flavor": "helios", "image": node.images.hfs, "replicas": 1,
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}},
                "auth": {"apiKeys": ["clients"]},
                "audit": {"destination": {"persistentVolumeClaim": {"claimName": CLAIM}},
                          "sealEvery": SEAL_EVERY, "retention": "30d"},
            }
        }),
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let key_data = wait_for("the signing key Secret", Duration::from_secs(60), || {
        let secrets = secrets.clone();
        async move { Ok(secrets.get_opt(&signing_key_secret("patients")).await?.and_then(|s| s.data)) }
    })
    .await
    .expect("signing key");
    let signing_pem = key_data[fhir_operator::audit::SIGNING_KEY_ENTRY].0.clone();

    // -- The project's writer on the host: its own stream, the endpoint's key.
    let key_file = d.join("signing-key.pem");
    std::fs::write(&key_file, &signing_pem).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let access_log = d.join("access.log");
    std::fs::write(&access_log, "").expect("access log");
    let metrics_port = free_port().expect("port");
    let mut command = Command::new(operator::binary());
    command
        .arg("audit-sidecar")
        .arg("--access-log")
        .arg(&access_log)
        .arg("--signing-key")
        .arg(&key_file)
        .args(["--seal-every", SEAL_EVERY, "--retention", "30d", "--stream", WRITER_STREAM])
        .arg(format!("--dir={}", trail.display()))
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    let writer = OwnedProcess::start("fhir-operator", command, d.join("writer.log"));
    writer.await_port(metrics_port);
    append_requests(&access_log, RECORDS);

    // -- The operator's Job verifies both streams on the node: Pass.
    let endpoints: Api<FhirEndpoint> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    let passed = wait_for("auditLog AuditTrailVerified with the writer's records", WAIT, || {
        let endpoints = endpoints.clone();
        async move {
            Ok(audit_log_entry(&endpoints, "patients", "AuditTrailVerified").await?.filter(|(ep, _)| {
                ep.status.as_ref().and_then(|s| s.audit.as_ref()).is_some_and(|a| a.records >= RECORDS as u64)
            }))
        }
    })
    .await;
    let (ep, entry) = match passed {
        Ok(found) => found,
        Err(e) => panic!("{e}\n{}", diagnose(&client, &operator, &writer).await),
    };
    eprintln!("auditLog passed {:?} after the records were written: {entry:?}", t.elapsed());
    assert_eq!(entry.status, ComplianceStatus::Pass);
    assert!(entry.evidence.iter().any(|e| e == &format!("destination PersistentVolumeClaim/{CLAIM}")), "{entry:?}");
    let audit_status = ep.status.clone().expect("status").audit.expect("status.audit");
    assert!(audit_status.last_checkpoint.is_some() && audit_status.problem.is_empty(), "{audit_status:?}");

    // The Job that said so: the endpoint's, on the node, the claim read-only,
    // no token, and a summary in its termination message.
    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let listed = jobs.list(&ListParams::default().labels(&format!("{VERIFY_LABEL}=patients"))).await.expect("jobs");
    assert!(!listed.items.is_empty() && listed.items.len() <= 2, "superseded Jobs are deleted: {}", listed.items.len());
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut summaries = Vec::new();
    for job in &listed.items {
        let owner = job.metadata.owner_references.clone().unwrap_or_default();
        assert!(owner.iter().any(|o| o.kind == "FhirEndpoint" && o.name == "patients" && o.controller == Some(true)));
        let name = job.metadata.name.clone().unwrap_or_default();
        for pod in pods.list(&ListParams::default().labels(&format!("job-name={name}"))).await.expect("pods").items {
            let spec = pod.spec.clone().expect("pod spec");
            assert_eq!(spec.automount_service_account_token, Some(false));
            assert_eq!(spec.node_name.as_deref(), Some(node.name.as_str()));
            let claim = spec.volumes.iter().flatten().find_map(|v| v.persistent_volume_claim.clone()).expect("claim");
            assert_eq!((claim.claim_name.as_str(), claim.read_only), (CLAIM, Some(true)));
            let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
            for s in statuses.iter().filter(|s| s.name == VERIFY_CONTAINER) {
                if let Some(message) =
                    s.state.as_ref().and_then(|st| st.terminated.as_ref()).and_then(|t| t.message.clone())
                {
                    summaries.push(message);
                }
            }
        }
    }
    let verified: Vec<Summary> = summaries.iter().filter_map(|m| Summary::parse(m).ok()).collect();
    // The writer's stream, and the gateway pod's once its sidecar has sealed.
    assert!(verified.iter().any(|s| s.result == Outcome::Verified && s.records >= RECORDS as u64), "{summaries:?}");
    let rendered = serde_json::to_string(&listed.items).expect("json");
    let pem_body: String = String::from_utf8_lossy(&signing_pem).lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!rendered.contains(&pem_body), "the private key is in no Job");

    // -- An auditor's check on the host agrees.
    let public_pem = String::from_utf8(key_data[fhir_operator::audit::PUBLIC_KEY_ENTRY].0.clone()).expect("PEM");
    std::fs::write(d.join("public.pem"), &public_pem).expect("public key");
    let verify = Command::new(operator::binary())
        .args(["audit", "verify", &format!("--dir={}", trail.display()), "--stream", WRITER_STREAM])
        .arg("--public-key")
        .arg(d.join("public.pem"))
        .output()
        .expect("audit verify");
    let said = String::from_utf8_lossy(&verify.stdout).into_owned() + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.contains(&format!("{RECORDS} records")), "{said}");

    // -- Across the next period's Job, the entry stays Pass: the last
    // verification holds while the next one runs (no drop to Unknown at
    // every period's start).
    let jobs_before: Vec<String> = listed.items.iter().filter_map(|j| j.metadata.name.clone()).collect();
    let watched = Instant::now();
    let mut new_job = false;
    while watched.elapsed() < Duration::from_secs(30) {
        let ep = endpoints.get("patients").await.expect("endpoint");
        let entry = ep.status.as_ref().and_then(|s| {
            s.compliance.iter().find(|c| c.name == fhir_operator::api::ComplianceCheck::AuditLog).cloned()
        });
        assert!(
            entry.as_ref().is_some_and(|e| e.status == ComplianceStatus::Pass),
            "auditLog left Pass {:?} after it passed: {entry:?}",
            watched.elapsed()
        );
        let now_listed = jobs.list(&ListParams::default().labels(&format!("{VERIFY_LABEL}=patients"))).await;
        new_job |= now_listed
            .map(|l| l.items.iter().any(|j| j.metadata.name.as_ref().is_some_and(|n| !jobs_before.contains(n))))
            .unwrap_or(false);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(new_job, "a new period's verification Job ran meanwhile");

    // -- One byte of a sealed record changed on the volume: Fail, naming
    // the segment and the record.
    let segments_dir = trail.join(WRITER_STREAM).join("segments");
    let segment = std::fs::read_dir(&segments_dir)
        .expect("segments")
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.lines().count() >= 3))
        .expect("a segment with three records");
    let text = std::fs::read_to_string(&segment).expect("segment");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let seq = serde_json::from_str::<serde_json::Value>(&lines[1]).expect("record")["seq"].as_u64().expect("seq");
    lines[1] = lines[1].replacen("\"outcome\":200", "\"outcome\":201", 1);
    assert_ne!(lines.join("\n") + "\n", text, "the record changed");
    std::fs::write(&segment, lines.join("\n") + "\n").expect("tamper");
    let t = Instant::now();
    let broken = wait_for("auditLog AuditTrailBroken", WAIT, || {
        let endpoints = endpoints.clone();
        async move { audit_log_entry(&endpoints, "patients", "AuditTrailBroken").await }
    })
    .await;
    let (ep, entry) = match broken {
        Ok(found) => found,
        Err(e) => panic!("{e}\n{}", diagnose(&client, &operator, &writer).await),
    };
    eprintln!("after tampering, {:?}: {entry:?}", t.elapsed());
    assert_eq!(entry.status, ComplianceStatus::Fail);
    let name = segment.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(entry.message.contains(name), "names the segment {name}: {}", entry.message);
    assert!(entry.message.contains(&format!("record seq {seq}")), "names record {seq}: {}", entry.message);
    assert!(entry.message.contains(WRITER_STREAM), "names the stream: {}", entry.message);

    // -- Canary: no key material and no record content in status or the operator's log.
    let places: BTreeMap<&str, String> = BTreeMap::from([
        ("the status", serde_json::to_string(&ep.status).unwrap_or_default()),
        ("the operator's log", operator.logs()),
    ]);
    for (place, text) in &places {
        assert!(!text.contains(&pem_body), "the private key is in {place}");
        assert!(!text.contains("canary-patient"), "a record's patient id is in {place}");
    }
}
