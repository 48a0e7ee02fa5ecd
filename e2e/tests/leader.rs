//! Leader election with real operator processes against a real API server:
//! of two replicas only the leader reconciles; after `kill -9` of the leader
//! the standby takes over within the lease duration; after SIGTERM the
//! leader stops its controllers and releases the lease, and the standby
//! takes over at its next check (the old lease's expiry). The takeover times
//! are printed.

use std::time::{Duration, Instant};

use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{apply_value, cluster, examples, install_crds, namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};

const LEASE_SECONDS: u64 = 4;
const WAIT: Duration = Duration::from_secs(60);

fn candidate(lease_ns: &str) -> Operator {
    let args = ["--leader-elect=true", "--lease-duration=4s", &format!("--lease-namespace={lease_ns}")];
    Operator::start(cluster().operator_kubeconfig(), &args)
        .expect("operator starts and is ready (as leader or standby)")
}

fn leads(operator: &Operator) -> bool {
    operator.metric("fhir_operator_leader") == 1.0
}

/// Waits until `operator` leads; returns how long that took.
fn wait_to_lead(operator: &Operator, limit: Duration) -> Duration {
    let started = Instant::now();
    while !leads(operator) {
        assert!(started.elapsed() < limit, "no takeover within {limit:?}; log:\n{}", operator.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

async fn holder(lease_ns: &str) -> String {
    let leases: Api<Lease> = Api::namespaced(cluster().client().await, lease_ns);
    let lease = leases.get("fhir-operator").await.expect("the Lease exists");
    lease.spec.and_then(|s| s.holder_identity).unwrap_or_default()
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let client = cluster().client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let lease_ns = namespace(&client, "lease").await.unwrap();
    let ns = namespace(&client, "leader").await.unwrap();

    let first = candidate(&lease_ns);
    wait_to_lead(&first, WAIT);
    let second = candidate(&lease_ns);
    let (code, body) = second.get("/readyz").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "standby: waiting for the leader lease"),
        "a standby is ready to take over"
    );
    assert!(holder(&lease_ns).await.ends_with(&format!("-{}", first.pid())), "the Lease names the first process");

    // Only the leader reconciles and writes.
    let trial = examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object;
    apply_value(&client, &ns, &trial).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for("the leader creates the Deployment", WAIT, || {
        let deployments = deployments.clone();
        async move { Ok(deployments.get_opt("trial").await?) }
    })
    .await
    .unwrap();
    assert!(first.metric("fhir_operator_child_writes_total") > 0.0);
    assert_eq!(second.metric("fhir_operator_reconciliations_total"), 0.0, "the standby reconciles nothing");
    assert_eq!(second.metric("fhir_operator_child_writes_total"), 0.0, "the standby writes nothing");
    assert!(!leads(&second));

    // kill -9 the leader: the standby takes over within the lease duration.
    let mut first = first;
    first.kill9();
    let crash_takeover = wait_to_lead(&second, Duration::from_secs(LEASE_SECONDS * 3));
    println!("takeover after kill -9 of the leader: {:.2} s (lease {LEASE_SECONDS} s)", crash_takeover.as_secs_f64());
    assert!(crash_takeover <= Duration::from_secs(LEASE_SECONDS + 2), "takeover took {crash_takeover:?}");
    assert!(holder(&lease_ns).await.ends_with(&format!("-{}", second.pid())));
    // The new leader reconciles: a deleted child comes back.
    deployments.delete("trial", &DeleteParams::default()).await.unwrap();
    wait_for("the new leader recreates the Deployment", WAIT, || {
        let deployments = deployments.clone();
        async move { Ok(deployments.get_opt("trial").await?.filter(|d| d.metadata.deletion_timestamp.is_none())) }
    })
    .await
    .unwrap();

    // SIGTERM: the leader releases the lease; a new standby takes over
    // before the lease would have expired.
    let third = candidate(&lease_ns);
    assert!(!leads(&third));
    let mut second = second;
    let stopped = Instant::now();
    let status = second.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "a clean exit on SIGTERM: {status}");
    wait_to_lead(&third, Duration::from_secs(LEASE_SECONDS * 3));
    // From SIGTERM to the new leader leading, the old one's shutdown included.
    let handover = stopped.elapsed();
    println!("handover after SIGTERM of the leader: {:.2} s (lease {LEASE_SECONDS} s)", handover.as_secs_f64());
    assert!(handover < Duration::from_secs(LEASE_SECONDS), "released, not expired: {handover:?}");
    assert!(second.logs().contains("released the lease"), "{}", second.logs());
}
