//! The FhirEndpoint controller against a real kube-apiserver and
//! kube-controller-manager, run as the real `fhir-operator` binary with
//! exactly its RBAC.

use std::collections::BTreeMap;
use std::time::Duration;

use fhir_operator::api::{FhirEndpoint, RateLimitTier};
use fhir_operator_e2e::examples;
use fhir_operator_e2e::operator::{Operator, grant_rbac};
use fhir_operator_e2e::{apply_value, cluster, install_crds, mark_pods_ready, namespace, operator_writes, wait_for};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// A value placed in the database credentials Secret: it must never show
/// up anywhere the operator writes or logs.
const CANARY: &str = "canary-5f2b9c1e-never-print-me";

struct Env {
    client: Client,
    ns: String,
    operator: Operator,
}

async fn setup(prefix: &str, operator_args: &[&str]) -> Env {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let ns = namespace(&client, prefix).await.expect("namespace");
    let operator = Operator::start(cluster.operator_kubeconfig(), operator_args).expect("operator");
    Env { client, ns, operator }
}

/// The Secrets the full example refers to: a TLS Secret and database
/// credentials (holding the canary).
async fn create_referenced_secrets(client: &Client, ns: &str) {
    let names = fhir_operator::fhirendpoint::tls::dns_names("patients", ns);
    let now = k8s_openapi::jiff::Timestamp::now();
    let (cert, key) = fhir_operator::fhirendpoint::tls::issue(&names, now).expect("cert");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut tls = fhir_operator::fhirendpoint::tls::secret(Default::default(), cert, key);
    tls.metadata.name = Some("patients-tls".into());
    secrets.create(&PostParams::default(), &tls).await.expect("tls secret");
    let creds = Secret {
        metadata: kube::api::ObjectMeta { name: Some("patients-db-credentials".into()), ..Default::default() },
        data: Some(BTreeMap::from([
            ("username".to_owned(), ByteString(b"fhir".to_vec())),
            ("password".to_owned(), ByteString(CANARY.as_bytes().to_vec())),
        ])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &creds).await.expect("credentials secret");
    // The database CA (spec.database.caSecret): any certificate will do,
    // nothing connects here.
    let names = fhir_operator::fhirendpoint::tls::dns_names("patients-db", ns);
    let (cert, _) = fhir_operator::fhirendpoint::tls::issue(&names, now).expect("ca");
    let ca = Secret {
        metadata: kube::api::ObjectMeta { name: Some("patients-db-ca".into()), ..Default::default() },
        data: Some(BTreeMap::from([("ca.crt".to_owned(), ByteString(cert.into_bytes()))])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &ca).await.expect("database CA secret");
}

async fn apply_examples(client: &Client, ns: &str) {
    for example in examples::valid().expect("examples") {
        apply_value(client, ns, &example.object).await;
    }
}

fn condition<'a>(
    ep: &'a FhirEndpoint,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    ep.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

async fn wait_condition(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> FhirEndpoint {
    let api: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("{name}: {type_}={status} {reason:?}"), WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get(name).await?;
            let hit = condition(&ep, type_).is_some_and(|c| c.status == status && reason.is_none_or(|r| c.reason == r));
            Ok(hit.then_some(ep))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

async fn make_ready(client: &Client, ns: &str, name: &str) {
    let selector = format!("fhiroperator.io/endpoint={name}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("{name}'s Deployment available"), WAIT, || {
        let (client, deployments, selector) = (client.clone(), deployments.clone(), selector.clone());
        async move {
            mark_pods_ready(&client, ns, &selector).await?;
            let d = deployments.get(name).await?;
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
            Ok((available >= want).then_some(()))
        }
    })
    .await
    .expect("deployment available");
}

fn owned_by(meta: &kube::api::ObjectMeta, ep: &FhirEndpoint) -> bool {
    meta.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.uid == ep.uid().unwrap_or_default() && r.controller == Some(true) && r.kind == "FhirEndpoint")
    })
}

async fn children_of(client: &Client, ns: &str, ep: &FhirEndpoint) -> Vec<String> {
    let name = ep.name_any();
    let mut found = Vec::new();
    macro_rules! check {
        ($t:ty, $child:expr) => {
            let api: Api<$t> = Api::namespaced(client.clone(), ns);
            if let Some(obj) = api.get_opt(&$child).await.expect("get child") {
                assert!(owned_by(obj.meta(), ep), "{} {} is not owned by its endpoint", <$t>::kind(&()), $child);
                found.push(format!("{}/{}", <$t>::kind(&()), $child));
            }
        };
    }
    check!(ServiceAccount, name.clone());
    check!(ConfigMap, format!("{name}-gateway"));
    check!(Deployment, name.clone());
    check!(Service, name.clone());
    check!(NetworkPolicy, name.clone());
    if ep.spec.tls.is_none() {
        // Self-issued; a user's TLS Secret is theirs, not a child.
        check!(Secret, format!("{name}-tls"));
    }
    found
}

#[tokio::test]
async fn examples_get_their_children_become_ready_and_report_compliance() {
    let env = setup("children", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    create_referenced_secrets(client, ns).await;
    apply_examples(client, ns).await;

    for name in ["trial", "patients"] {
        let ep = wait_condition(client, ns, name, "Progressing", "True", Some("RollingOut")).await;
        let children = children_of(client, ns, &ep).await;
        let mut expected = vec![
            format!("ServiceAccount/{name}"),
            format!("ConfigMap/{name}-gateway"),
            format!("Deployment/{name}"),
            format!("Service/{name}"),
            format!("NetworkPolicy/{name}"),
        ];
        if name == "trial" {
            expected.push("Secret/trial-tls".into()); // self-issued
        }
        assert_eq!(children, expected, "{name}: children");
        make_ready(client, ns, name).await;
        let ep = wait_condition(client, ns, name, "Ready", "True", Some("Available")).await;
        let status = ep.status.clone().unwrap();
        assert_eq!(status.observed_generation, ep.metadata.generation);
        assert_eq!(status.url.as_deref(), Some(format!("https://{name}.{ns}.svc").as_str()));
        assert_eq!(status.compliance.len(), 7, "{name}: one entry per safeguard");
        let summary = status.compliance_summary.clone().unwrap();
        println!(
            "{name}: compliance {summary}: {:?}",
            status.compliance.iter().map(|c| (c.name, c.status)).collect::<Vec<_>>()
        );
        if name == "patients" {
            // What the Deployment was given, read back: verified TLS with the mounted CA.
            let tls = status.compliance.iter().find(|c| c.reason == "Tls13Only").expect("tls passes");
            let want = [
                format!("Deployment/{ns}/patients:env SPRING_DATASOURCE_URL sslmode=verify-full"),
                format!("Secret/{ns}/patients-db-ca:ca.crt"),
            ];
            assert!(want.iter().all(|w| tls.evidence.contains(w)), "{:?}", tls.evidence);
        }
        // No monitoring CRDs in this cluster: said so, nothing failed.
        let degraded = condition(&ep, "Degraded").unwrap();
        assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "MonitoringNotServed"));
    }

    // The full example: two replicas get a PodDisruptionBudget (policy/v1beta1 on 1.20).
    let pdbs = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("policy", "v1beta1", "PodDisruptionBudget")),
    );
    assert!(pdbs.get_opt("patients").await.unwrap().is_some(), "PDB for 2 replicas");
    let trial: FhirEndpoint = Api::namespaced(client.clone(), ns).get("trial").await.unwrap();
    let database = trial.status.unwrap().compliance.into_iter().find(|c| c.reason == "EmbeddedDatabase");
    assert!(database.is_some(), "the embedded database is reported as not production-ready");

    // Nobody edited anything: an auditor must see no drift correction
    // (Kubernetes' own amendments, such as ServiceAccount tokens, are not drift).
    let all_events: Api<Event> = Api::namespaced(client.clone(), ns);
    let drift: Vec<String> = all_events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("DriftCorrected"))
        .filter_map(|e| e.note)
        .collect();
    assert!(drift.is_empty(), "false drift corrections: {drift:?}");

    // Secrets stay secret: the canary is nowhere the operator writes.
    assert!(!env.operator.logs().contains(CANARY), "canary in the operator's logs");
    assert!(!env.operator.metrics().contains(CANARY), "canary in the metrics");
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let events = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap()).unwrap();
    assert!(!events.contains(CANARY), "canary in events");
    let eps: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    assert!(!serde_json::to_string(&eps.list(&ListParams::default()).await.unwrap()).unwrap().contains(CANARY));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    assert!(!serde_json::to_string(&cms.list(&ListParams::default()).await.unwrap()).unwrap().contains(CANARY));
}

#[tokio::test]
async fn drift_is_put_back_and_deletion_collects_the_children() {
    let env = setup("drift", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    apply_value(client, ns, &examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object)
        .await;
    let ep = wait_condition(client, ns, "trial", "Progressing", "True", None).await;

    // A hand edit of the gateway configuration is put back.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let original = cms.get("trial-gateway").await.unwrap().data.unwrap();
    let edit = json!({"data": {"nginx.conf": "# edited by hand\n"}});
    cms.patch("trial-gateway", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    wait_for("the ConfigMap put back", WAIT, || {
        let (cms, original) = (cms.clone(), original.clone());
        async move { Ok((cms.get("trial-gateway").await?.data == Some(original)).then_some(())) }
    })
    .await
    .unwrap();

    // A deleted child is recreated.
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let old_uid = nps.get("trial").await.unwrap().uid();
    nps.delete("trial", &DeleteParams::default()).await.unwrap();
    wait_for("the NetworkPolicy recreated", WAIT, || {
        let (nps, old_uid) = (nps.clone(), old_uid.clone());
        async move { Ok(nps.get_opt("trial").await?.filter(|np| np.uid() != old_uid).map(|_| ())) }
    })
    .await
    .unwrap();

    // An auditor sees the correction.
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for("a DriftCorrected event", WAIT, || {
        let events = events.clone();
        async move {
            Ok(events
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("DriftCorrected"))
                .then_some(()))
        }
    })
    .await
    .unwrap();

    // Deleting the endpoint removes its children (garbage collection).
    let eps: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    eps.delete("trial", &DeleteParams::default()).await.unwrap();
    wait_for("children garbage-collected", WAIT, || {
        let (client, ep) = (client.clone(), ep.clone());
        async move { Ok(children_of(&client, ns, &ep).await.is_empty().then_some(())) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_invalid_spec_is_reported_by_field_while_others_reconcile() {
    let env = setup("invalid", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    // CEL-only invalid example: v1.20 accepts it, the operator refuses it.
    let invalid = examples::invalid()
        .unwrap()
        .into_iter()
        .find(|e| e.file_name() == "fhirendpoint-empty-access-peer.yaml")
        .unwrap();
    apply_value(client, ns, &invalid.object).await;
    apply_value(client, ns, &examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object)
        .await;

    let bad = wait_condition(client, ns, invalid.name(), "Ready", "False", Some("InvalidSpec")).await;
    let message = &condition(&bad, "Ready").unwrap().message;
    assert!(message.starts_with("spec.access.from[0]"), "names the field: {message}");
    assert_eq!(bad.status.as_ref().unwrap().observed_generation, bad.metadata.generation);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    assert!(deployments.get_opt(invalid.name()).await.unwrap().is_none(), "nothing built from an invalid spec");

    let good = wait_condition(client, ns, "trial", "Progressing", "True", None).await;
    assert_eq!(children_of(client, ns, &good).await.len(), 6, "the valid endpoint was reconciled");

    // A tier that does not exist: Ready=False TierNotFound, healed when it appears.
    let mut tiered = examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object;
    tiered["metadata"]["name"] = json!("tiered");
    tiered["spec"] = json!({"rateLimit": {"tier": "e2e-platinum"}});
    apply_value(client, ns, &tiered).await;
    let blocked = wait_condition(client, ns, "tiered", "Ready", "False", Some("TierNotFound")).await;
    assert!(condition(&blocked, "Ready").unwrap().message.contains("e2e-platinum"));
    let tiers: Api<RateLimitTier> = Api::all(client.clone());
    let tier: RateLimitTier = serde_json::from_value(json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "RateLimitTier",
        "metadata": {"name": "e2e-platinum"}, "spec": {"requestsPerSecond": 500}
    }))
    .unwrap();
    tiers.create(&PostParams::default(), &tier).await.unwrap();
    wait_condition(client, ns, "tiered", "Progressing", "True", Some("RollingOut")).await;
    let _ = tiers.delete("e2e-platinum", &DeleteParams::default()).await;
}

/// A host the schema's pattern lets through (digits and dots) but that is no
/// IPv4 address: the operator refuses it by field and applies nothing.
#[tokio::test]
async fn a_hostile_database_host_is_refused_by_field_and_nothing_is_applied() {
    let env = setup("hostile", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    let endpoint = json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": "hostile"},
        "spec": {"database": {"host": "999.0.0.1", "name": "fhir", "credentialsSecret": "db"}},
    });
    apply_value(client, ns, &endpoint).await;
    let bad = wait_condition(client, ns, "hostile", "Ready", "False", Some("InvalidSpec")).await;
    let message = &condition(&bad, "Ready").unwrap().message;
    assert!(message.starts_with("spec.database.host: \"999.0.0.1\""), "names the field: {message}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    assert!(deployments.get_opt("hostile").await.unwrap().is_none(), "nothing applied from a hostile spec");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    assert!(config_maps.get_opt("hostile-gateway").await.unwrap().is_none());

    // The API server's own schema refuses the injection itself, naming the field.
    let api: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    let mut injected = endpoint.clone();
    injected["metadata"]["name"] = json!("injected");
    injected["spec"]["database"]["host"] = json!("evil.example/fhir?sslmode=disable&x=");
    let err = api
        .create(&PostParams::default(), &serde_json::from_value(injected).unwrap())
        .await
        .expect_err("the schema refuses it");
    assert!(err.to_string().contains("spec.database.host"), "{err}");
}

#[tokio::test]
async fn a_steady_cluster_costs_no_writes() {
    let cluster = cluster();
    let Some(audit) = cluster.audit_log() else {
        panic!(
            "this test counts requests in the API server's audit log, which only a harness-started control plane has; \
                run it without USE_EXISTING_CLUSTER"
        );
    };
    let env = setup("steady", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    create_referenced_secrets(client, ns).await;
    apply_examples(client, ns).await;
    for name in ["trial", "patients"] {
        wait_condition(client, ns, name, "Progressing", "True", None).await;
        make_ready(client, ns, name).await;
        wait_condition(client, ns, name, "Ready", "True", None).await;
    }
    // Converged. From here on nothing changes, so nothing may be written.
    let before = operator_writes(audit).unwrap().len();
    let quiet = Duration::from_secs(10);
    tokio::time::sleep(quiet).await; // the measurement window, not a synchronisation
    let writes = operator_writes(audit).unwrap();
    let during: Vec<&String> = writes[before..].iter().collect();
    println!("operator writes before convergence: {before}; during {quiet:?} of steady state: {}", during.len());
    assert!(during.is_empty(), "writes in steady state: {during:#?}");
}

/// A cluster with prometheus-operator's kinds: every endpoint also gets a
/// ServiceMonitor and a PrometheusRule, and nothing is degraded.
#[tokio::test]
async fn monitoring_children_appear_when_the_cluster_serves_them() {
    use fhir_operator::fhirendpoint::monitoring::{PrometheusRule, ServiceMonitor};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    let client = cluster().client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [ServiceMonitor::crd(), PrometheusRule::crd()] {
        if crds.get_opt(crd.metadata.name.as_deref().unwrap()).await.unwrap().is_none() {
            crds.create(&PostParams::default(), &crd).await.expect("monitoring CRD");
        }
        let name = crd.metadata.name.clone().unwrap();
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(WAIT, established).await.expect("established in time").expect("established");
    }
    // Started after the CRDs: the operator discovers them.
    let env = setup("monitoring", &[]).await;
    let (client, ns) = (&env.client, env.ns.as_str());
    apply_value(client, ns, &examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object)
        .await;
    let ep = wait_condition(client, ns, "trial", "Degraded", "False", Some("AsExpected")).await;
    let monitors: Api<ServiceMonitor> = Api::namespaced(client.clone(), ns);
    let rules: Api<PrometheusRule> = Api::namespaced(client.clone(), ns);
    let monitor = wait_for("the ServiceMonitor", WAIT, || {
        let monitors = monitors.clone();
        async move { Ok(monitors.get_opt("trial").await?) }
    })
    .await
    .unwrap();
    assert!(owned_by(&monitor.metadata, &ep));
    let rule = rules.get("trial").await.expect("the PrometheusRule");
    assert!(owned_by(&rule.metadata, &ep));
    let alerts: Vec<String> = rule.spec.groups.iter().flat_map(|g| g.rules.iter().map(|r| r.alert.clone())).collect();
    assert!(alerts.contains(&"FhirEndpointHighLatencyP99".to_owned()), "{alerts:?}");

    // Turning monitoring off removes both.
    let eps: Api<FhirEndpoint> = Api::namespaced(client.clone(), ns);
    eps.patch(
        "trial",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint", "metadata": {"name": "trial"},
            "spec": {"monitoring": {"enabled": false}}
        })),
    )
    .await
    .unwrap();
    wait_for("monitoring children removed", WAIT, || {
        let (monitors, rules) = (monitors.clone(), rules.clone());
        async move {
            Ok((monitors.get_opt("trial").await?.is_none() && rules.get_opt("trial").await?.is_none()).then_some(()))
        }
    })
    .await
    .unwrap();
}

/// `--namespace` limits the operator to the listed namespaces; `/metrics`
/// counts reconciles; SIGTERM stops it cleanly.
#[tokio::test]
async fn watches_only_listed_namespaces_serves_metrics_and_stops_cleanly() {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    grant_rbac(&client).await.expect("RBAC");
    let watched = namespace(&client, "watched").await.unwrap();
    let other = namespace(&client, "other").await.unwrap();
    let mut operator =
        Operator::start(cluster.operator_kubeconfig(), &[&format!("--namespace={watched}")]).expect("operator");
    let trial = examples::valid().unwrap().into_iter().find(|e| e.name() == "trial").unwrap().object;
    apply_value(&client, &other, &trial).await;
    apply_value(&client, &watched, &trial).await;
    wait_condition(&client, &watched, "trial", "Progressing", "True", None).await;
    let ignored: FhirEndpoint = Api::namespaced(client.clone(), &other).get("trial").await.unwrap();
    assert!(ignored.status.is_none(), "an unwatched namespace is left alone");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &other);
    assert!(deployments.get_opt("trial").await.unwrap().is_none());

    let metrics = operator.metrics();
    assert!(metrics.contains("fhir_operator_reconciliations_total{controller=\"fhirendpoint\"}"), "{metrics}");
    assert!(metrics.contains("fhir_operator_reconcile_duration_seconds_bucket"), "{metrics}");
    assert!(metrics.contains("fhir_operator_child_writes_total{"), "{metrics}");
    let (code, _) = operator.get("/healthz").unwrap();
    assert_eq!(code, 200);
    // Every log line is one JSON object.
    let logs = operator.logs();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    let status = operator.terminate(Duration::from_secs(15)).expect("stops on SIGTERM");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}
