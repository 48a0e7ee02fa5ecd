//! RateLimitTiers against a real API server: tier status lists its
//! endpoints, a tier edit reconfigures exactly the endpoints that use it,
//! a missing or invalid tier stops an endpoint from being reconfigured
//! (with a reason) and heals when fixed.

use std::collections::BTreeMap;
use std::time::Duration;

use fhir_operator::api::{FhirEndpoint, RateLimitTier};
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{cluster, install_crds, namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

async fn apply_tier(client: &Client, name: &str, spec: serde_json::Value) {
    let tiers: Api<RateLimitTier> = Api::all(client.clone());
    let tier = json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "RateLimitTier", "metadata": {"name": name}, "spec": spec});
    tiers.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(tier)).await.expect("apply tier");
}

async fn apply_endpoint(client: &Client, ns: &str, name: &str, tier: &str) {
    let eps: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    let ep = json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": name},
        "spec": {"rateLimit": {"tier": tier}, "monitoring": {"enabled": false}}});
    eps.patch(name, &PatchParams::apply("e2e").force(), &Patch::Apply(ep)).await.expect("apply endpoint");
}

async fn ready_reason(client: &Client, ns: &str, name: &str) -> Option<String> {
    let ep = Api::<FhirEndpoint>::namespaced(client.clone(), ns).get(name).await.ok()?;
    ep.status?.conditions.into_iter().find(|c| c.type_ == "Ready").map(|c| c.reason)
}

async fn wait_reason(client: &Client, ns: &str, name: &str, reason: &str) {
    wait_for(&format!("{name}: Ready reason {reason}"), WAIT, || async move {
        Ok((ready_reason(client, ns, name).await.as_deref() == Some(reason)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Each endpoint's (config hash on the pod template, gateway config).
async fn gateway_state(client: &Client, ns: &str, names: &[&str]) -> BTreeMap<String, (String, String)> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut out = BTreeMap::new();
    for name in names {
        let d = deployments.get(name).await.expect("deployment");
        let hash = d.spec.and_then(|s| s.template.metadata).and_then(|m| m.annotations).unwrap_or_default()
            ["fhiroperator.io/config-hash"]
            .clone();
        let conf =
            configs.get(&format!("{name}-gateway")).await.expect("config").data.unwrap_or_default()["nginx.conf"]
                .clone();
        out.insert((*name).to_owned(), (hash, conf));
    }
    out
}

async fn tier_users(client: &Client, name: &str) -> (i32, Vec<String>) {
    let tier = Api::<RateLimitTier>::all(client.clone()).get(name).await.expect("tier");
    let status = tier.status.unwrap_or_default();
    (status.endpoint_count, status.endpoints.into_iter().map(|e| format!("{}/{}", e.namespace, e.name)).collect())
}

#[tokio::test]
async fn a_tier_edit_reconfigures_exactly_its_endpoints_and_a_missing_tier_heals() {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let ns = namespace(&client, "tiers").await.unwrap();
    let operator = Operator::start(cluster.operator_kubeconfig(), &[]).expect("operator");
    let ns = ns.as_str();

    apply_tier(&client, "silver", json!({"requestsPerSecond": 30, "burst": 10})).await;
    apply_tier(&client, "copper", json!({"requestsPerSecond": 5})).await;
    for (name, tier) in [("alpha", "silver"), ("beta", "silver"), ("gamma", "copper")] {
        apply_endpoint(&client, ns, name, tier).await;
    }
    for name in ["alpha", "beta", "gamma"] {
        wait_reason(&client, ns, name, "RollingOut").await;
    }
    let expected = vec![format!("{ns}/alpha"), format!("{ns}/beta")];
    wait_for("silver lists alpha and beta", WAIT, || {
        let expected = expected.clone();
        let client = client.clone();
        async move { Ok((tier_users(&client, "silver").await == (2, expected)).then_some(())) }
    })
    .await
    .unwrap();
    assert_eq!(tier_users(&client, "copper").await, (1, vec![format!("{ns}/gamma")]));

    // Editing silver changes alpha's and beta's gateway, not gamma's.
    let before = gateway_state(&client, ns, &["alpha", "beta", "gamma"]).await;
    apply_tier(&client, "silver", json!({"requestsPerSecond": 60, "burst": 10})).await;
    let after = wait_for("alpha and beta reconfigured", WAIT, || {
        let (client, before) = (client.clone(), before.clone());
        async move {
            let now = gateway_state(&client, ns, &["alpha", "beta", "gamma"]).await;
            Ok((now["alpha"].0 != before["alpha"].0 && now["beta"].0 != before["beta"].0).then_some(now))
        }
    })
    .await
    .unwrap();
    for name in ["alpha", "beta"] {
        assert!(after[name].1.contains("rate=60r/s"), "{name}: the new rate is in its gateway config");
    }
    assert_eq!(after["gamma"], before["gamma"], "gamma's tier did not change: neither did its gateway");

    // Deleting silver: both endpoints say so, and keep their configuration.
    Api::<RateLimitTier>::all(client.clone()).delete("silver", &DeleteParams::default()).await.unwrap();
    wait_reason(&client, ns, "alpha", "TierNotFound").await;
    wait_reason(&client, ns, "beta", "TierNotFound").await;
    assert_eq!(gateway_state(&client, ns, &["alpha", "beta"]).await["alpha"], after["alpha"]);
    // Recreating it heals them without a restart.
    apply_tier(&client, "silver", json!({"requestsPerSecond": 60, "burst": 10})).await;
    wait_reason(&client, ns, "alpha", "RollingOut").await;
    wait_reason(&client, ns, "beta", "RollingOut").await;

    // A tier no gateway can enforce is refused, and nothing is rendered from it.
    apply_tier(&client, "copper", json!({"requestsPerSecond": 5, "maxRequestBodySize": "99999999999999Gi"})).await;
    wait_for("copper refused", WAIT, || {
        let client = client.clone();
        async move {
            let tier = Api::<RateLimitTier>::all(client).get("copper").await?;
            let ready = tier.status.unwrap_or_default().conditions.into_iter().find(|c| c.type_ == "Ready");
            Ok(ready
                .filter(|c| c.reason == "InvalidSpec" && c.message.starts_with("spec.maxRequestBodySize"))
                .map(|_| ()))
        }
    })
    .await
    .unwrap();
    wait_reason(&client, ns, "gamma", "TierInvalid").await;
    assert_eq!(gateway_state(&client, ns, &["gamma"]).await["gamma"], before["gamma"], "nothing rendered from it");

    // An endpoint that moves to another tier leaves the first one's list.
    apply_endpoint(&client, ns, "beta", "copper").await;
    wait_for("silver lists alpha only", WAIT, || {
        let client = client.clone();
        async move { Ok((tier_users(&client, "silver").await == (1, vec![format!("{ns}/alpha")])).then_some(())) }
    })
    .await
    .unwrap();
    drop(operator);
}
