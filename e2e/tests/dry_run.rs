//! The children the operator builds, offered to the real API server with
//! server-side dry run: for the examples and for generated specs (flavor
//! helios, caSecret, publicUrl, 3 replicas, a tier), every child passes
//! both a dry-run create (POST, admission and the OpenAPI schema) and a
//! dry-run server-side apply as the operator's field manager (which, unlike
//! a create on v1.20, refuses any field the schema does not declare). A
//! dry-run create also returns what the server would store: nothing the
//! operator sent may be missing from it (no silent pruning). Nothing is
//! persisted; the FhirEndpoint specs themselves are dry-run created too.

use std::collections::BTreeMap;

use fhir_operator::api::{FhirEndpoint, RateLimitTier};
use fhir_operator::discovery::{self, PdbApi, PodDisruptionBudgetV1beta1};
use fhir_operator::fhirendpoint::build::{self, Children, Images, Inputs, KeySource};
use fhir_operator::fhirendpoint::reconcile::FIELD_MANAGER;
use fhir_operator::fhirendpoint::validate;
use fhir_operator_e2e::{cluster, examples, install_crds, namespace};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// The endpoints to build children for: the examples, then generated ones.
fn samples(ns: &str) -> Vec<(String, Value)> {
    let mut samples: Vec<(String, Value)> = examples::valid()
        .expect("examples")
        .into_iter()
        .filter(|e| e.kind() == "FhirEndpoint")
        .map(|e| (e.file_name(), e.object))
        .collect();
    assert!(samples.len() >= 2, "the examples hold endpoints: {samples:?}");
    let endpoint = |name: &str, spec: Value| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
            "metadata": {"name": name}, "spec": spec})
    };
    let database = |ca: bool| {
        let mut db = json!({"host": "patients-db.databases.svc", "port": 5432, "name": "fhir",
            "credentialsSecret": "patients-db-credentials", "sslMode": "verify-full"});
        if ca {
            db["caSecret"] = json!("patients-db-ca");
        }
        db
    };
    samples.extend([
        (
            "helios on PostgreSQL with caSecret and publicUrl".to_owned(),
            endpoint(
                "helios-pg",
                json!({"publicUrl": "https://fhir.clinical.example",
                "server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7"},
                "database": database(true), "auth": {"apiKeys": ["patients-clients"]}}),
            ),
        ),
        (
            "helios, embedded database, 3 replicas, a tier".to_owned(),
            endpoint(
                "helios-embedded",
                json!({"server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7", "replicas": 3},
                "rateLimit": {"tier": "gold"}}),
            ),
        ),
        (
            "hapi, 3 replicas, caSecret, IPv6 publicUrl with a port, a tier, access peers".to_owned(),
            endpoint(
                "hapi-ha",
                json!({"publicUrl": format!("https://[fd00::10]:8443/fhir"),
                "server": {"flavor": "hapi", "replicas": 3,
                    "env": [{"name": "HAPI_FHIR_ALLOW_MULTIPLE_DELETE", "value": "false"}]},
                "database": database(true), "rateLimit": {"tier": "gold"},
                "access": {"from": [{"namespaceSelector": {"matchLabels": {"team": "portal"}}}]}}),
            ),
        ),
        (
            "hapi, database without CA, its own TLS Secret".to_owned(),
            endpoint(
                "hapi-noca",
                json!({"database": database(false), "tls": {"secretName": "hapi-noca-tls"},
                "auth": {"apiKeys": ["patients-clients", "partners"]}}),
            ),
        ),
    ]);
    for (_, object) in &mut samples {
        object["metadata"]["namespace"] = json!(ns);
    }
    samples
}

fn tiers() -> BTreeMap<String, RateLimitTier> {
    examples::valid()
        .expect("examples")
        .into_iter()
        .filter(|e| e.kind() == "RateLimitTier")
        .map(|e| (e.name().to_owned(), serde_json::from_value(e.object).expect("a RateLimitTier")))
        .collect()
}

/// Dry-run create, then dry-run server-side apply, of one child.
async fn offer(client: &Client, ns: &str, what: &str, object: Value) -> usize {
    let obj: DynamicObject = serde_json::from_value(object.clone()).expect("a Kubernetes object");
    let types = obj.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("gvk");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk));
    let name = obj.name_any();
    let label = format!("{what}: {} {name}", types.kind);
    let created = api
        .create(&PostParams { dry_run: true, ..Default::default() }, &obj)
        .await
        .unwrap_or_else(|e| panic!("{label}: the API server refuses the dry-run create: {e}"));
    let stored = serde_json::to_value(&created).expect("JSON");
    let missing = missing_fields(&object, &stored, "");
    assert!(missing.is_empty(), "{label}: the API server would drop or change {missing:#?}");
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force().dry_run(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("{label}: the API server refuses the dry-run server-side apply: {e}"));
    1
}

/// Paths of `sent` whose value `stored` lacks or holds differently.
fn missing_fields(sent: &Value, stored: &Value, path: &str) -> Vec<String> {
    match (sent, stored) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .flat_map(|(k, v)| match b.get(k) {
                Some(w) => missing_fields(v, w, &format!("{path}.{k}")),
                // Go's `omitempty` stores no zero value (e.g. a probe's
                // initialDelaySeconds: 0): the same as sending none.
                None if is_zero(v) => Vec::new(),
                None => vec![format!("{path}.{k} = {v}")],
            })
            .collect(),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().flat_map(|(i, (v, w))| missing_fields(v, w, &format!("{path}[{i}]"))).collect()
        }
        (a, b) if a == b => Vec::new(),
        (a, b) => vec![format!("{path} = {a} (stored: {b})")],
    }
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_child_the_operator_builds_passes_the_api_servers_schema() {
    let started = std::time::Instant::now();
    let cluster = cluster();
    eprintln!("cluster: {}", cluster.description());
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    let ns = namespace(&client, "dryrun").await.expect("namespace");
    let capabilities = discovery::discover(&client).await.expect("discovery");
    eprintln!("cluster capabilities: {capabilities:?}");
    let tiers = tiers();
    let endpoints: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("fhiroperator.io", "v1alpha1", "FhirEndpoint")),
    );

    let (mut offered, mut sampled, mut pdbs) = (0, 0, 0);
    for (what, object) in samples(&ns) {
        // The spec itself is one the CRD's schema accepts.
        let as_dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("object");
        endpoints
            .create(&PostParams { dry_run: true, ..Default::default() }, &as_dynamic)
            .await
            .unwrap_or_else(|e| panic!("{what}: the CRD refuses the spec: {e}"));
        let mut ep: FhirEndpoint = serde_json::from_value(object).expect("a FhirEndpoint");
        // An owner needs a uid; the API server never sees this one persisted.
        ep.metadata.uid = Some(format!("00000000-0000-4000-8000-{:012}", sampled));
        let v = validate::validate(&ep).unwrap_or_else(|e| panic!("{what}: {e}"));
        let spec = &ep.spec;
        let inputs = Inputs {
            tier: spec.rate_limit.as_ref().map(|r| tiers[&r.tier].spec.clone()),
            keys: spec
                .auth
                .api_keys
                .iter()
                .map(|s| KeySource {
                    schedule: s.clone(),
                    secret_name: format!("{s}-keys"),
                    versions_fingerprint: "v1".into(),
                })
                .collect(),
            tls_secret: spec
                .tls
                .as_ref()
                .map(|t| t.secret_name.clone())
                .unwrap_or_else(|| build::self_issued_tls_name(&v.name)),
            tls_fingerprint: "sha256:0".into(),
            capabilities,
            images: Images::default(),
            jwks: Vec::new(),
            audit_public_key: None,
            key_hints: None,
        };
        let children = build::build(&v, fhir_operator::meta::owner_ref(&ep), &inputs)
            .unwrap_or_else(|e| panic!("{what}: build: {e}"));
        // Every field, so that a new child kind fails to compile here too.
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
        let json = |o: &dyn erased::Json| o.json();
        for object in
            [json(&service_account), json(&gateway_config), json(&deployment), json(&service), json(&network_policy)]
        {
            offered += offer(&client, &ns, &what, object).await;
        }
        if let Some(pdb) = disruption_budget {
            let object = match capabilities.pdb {
                PdbApi::V1 => serde_json::to_value(&pdb).expect("JSON"),
                PdbApi::V1beta1 => serde_json::to_value(PodDisruptionBudgetV1beta1::from(pdb)).expect("JSON"),
                PdbApi::NotServed => unreachable!("built only where served"),
            };
            offered += offer(&client, &ns, &what, object).await;
            pdbs += 1;
        }
        // Built only where the cluster serves the monitoring kinds.
        for object in [service_monitor.map(|m| json(&m)), prometheus_rule.map(|r| json(&r))].into_iter().flatten() {
            offered += offer(&client, &ns, &what, object).await;
        }
        sampled += 1;
    }
    // The checks have teeth: a field the schema does not declare, and a
    // value it forbids, are refused.
    let mut ep: FhirEndpoint = serde_json::from_value(samples(&ns).remove(0).1).expect("endpoint");
    ep.metadata.uid = Some("00000000-0000-4000-8000-ffffffffffff".into());
    let v = validate::validate(&ep).expect("valid");
    let inputs = Inputs {
        tier: tiers.get("gold").map(|t| t.spec.clone()),
        keys: Vec::new(),
        tls_secret: "patients-tls".into(),
        tls_fingerprint: String::new(),
        capabilities,
        images: Images::default(),
        jwks: Vec::new(),
        audit_public_key: None,
        key_hints: None,
    };
    let deployment = build::build(&v, fhir_operator::meta::owner_ref(&ep), &inputs).expect("build").deployment;
    let mut unknown = serde_json::to_value(&deployment).expect("JSON");
    unknown["spec"]["template"]["spec"]["containers"][0]["notAField"] = json!(1);
    let obj: DynamicObject = serde_json::from_value(unknown).expect("object");
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "Deployment")),
    );
    let refused = deployments
        .patch(&obj.name_any(), &PatchParams::apply(FIELD_MANAGER).force().dry_run(), &Patch::Apply(&obj))
        .await;
    assert!(refused.is_err(), "server-side apply refuses an undeclared field: {refused:?}");
    let mut bad_port = serde_json::to_value(&deployment).expect("JSON");
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = json!(70000);
    let obj: DynamicObject = serde_json::from_value(bad_port).expect("object");
    let refused = deployments.create(&PostParams { dry_run: true, ..Default::default() }, &obj).await;
    assert!(refused.is_err(), "a dry-run create refuses an invalid port: {refused:?}");

    // Dry run persisted nothing.
    let stored = deployments.list(&Default::default()).await.expect("list");
    assert!(
        stored.items.is_empty(),
        "dry run stored {:?}",
        stored.items.iter().map(|d| d.name_any()).collect::<Vec<_>>()
    );
    let stored = endpoints.list(&Default::default()).await.expect("list");
    assert!(stored.items.is_empty(), "dry run stored endpoints");

    assert!(pdbs >= 2, "the 3-replica samples have disruption budgets (PDB API: {:?})", capabilities.pdb);
    eprintln!(
        "{offered} children of {sampled} endpoints accepted by dry-run create and dry-run server-side apply in {:.2?}",
        started.elapsed()
    );
}

/// Children of different types, as JSON.
mod erased {
    pub trait Json {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("a child serializes")
        }
    }
}
