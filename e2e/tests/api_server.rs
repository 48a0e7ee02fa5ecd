//! The CRDs and examples against a real kube-apiserver: every kind is
//! served, every example accepted as written (nothing pruned), printer
//! columns come back through the Table API, and every invalid example is
//! refused by the server with a message naming the field.

use fhir_operator::api;
use fhir_operator_e2e::examples::{self, Example, RefusedBy, missing_leaves};
use fhir_operator_e2e::{cluster, install_crds, namespace};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde_json::Value;

fn api_resource(kind: &str) -> ApiResource {
    match kind {
        "FhirEndpoint" => ApiResource::erase::<api::FhirEndpoint>(&()),
        "KeyRotationSchedule" => ApiResource::erase::<api::KeyRotationSchedule>(&()),
        "RateLimitTier" => ApiResource::erase::<api::RateLimitTier>(&()),
        "BackupPolicy" => ApiResource::erase::<api::BackupPolicy>(&()),
        other => panic!("unknown kind {other}"),
    }
}

fn dynamic_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let ar = api_resource(kind);
    if kind == "RateLimitTier" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    }
}

fn to_dynamic(example: &Example) -> DynamicObject {
    serde_json::from_value(example.object.clone())
        .unwrap_or_else(|e| panic!("{}: not a Kubernetes object: {e}", example.file_name()))
}

/// Server version, checked against the binary source the harness reports.
#[tokio::test]
async fn reports_which_api_server_it_tests_against() {
    let cluster = cluster();
    let version = cluster.client().await.apiserver_version().await.expect("GET /version");
    println!("e2e: kube-apiserver {} ({})", version.git_version, cluster.description());
    eprintln!("e2e: kube-apiserver {} ({})", version.git_version, cluster.description());
    if cluster.description().contains("Debian source package") {
        assert_eq!(version.git_version, fhir_operator_e2e::control_plane::KUBERNETES_VERSION);
    }
}

#[tokio::test]
async fn crds_install_and_every_kind_is_served_with_its_names() {
    let client = cluster().client().await;
    install_crds(&client).await.expect("install CRDs");
    // Installing again (an upgrade) replaces them in place.
    install_crds(&client).await.expect("re-install CRDs");
    let resources = client.list_api_group_resources("fhiroperator.io/v1alpha1").await.expect("discovery");
    for (plural, crd) in api::crds() {
        let served =
            resources.resources.iter().find(|r| r.name == plural).unwrap_or_else(|| panic!("{plural} not served"));
        assert_eq!(served.kind, crd.spec.names.kind);
        assert_eq!(served.short_names, crd.spec.names.short_names, "{plural}: short names");
        assert_eq!(served.categories.as_deref(), Some(&["fhiroperator".to_owned()][..]), "{plural}: category");
        assert_eq!(served.namespaced, crd.spec.scope == "Namespaced", "{plural}: scope");
        let status = resources.resources.iter().any(|r| r.name == format!("{plural}/status"));
        assert!(status, "{plural}: status subresource served");
    }
}

#[tokio::test]
async fn every_example_is_accepted_as_written_and_listed_with_printer_columns() {
    let client = cluster().client().await;
    install_crds(&client).await.expect("install CRDs");
    let ns = namespace(&client, "examples").await.expect("namespace");
    let examples = examples::valid().expect("examples");
    let params = PatchParams::apply("fhir-operator-e2e");
    for example in &examples {
        let api = dynamic_api(&client, &ns, example.kind());
        let applied = api
            .patch(example.name(), &params, &Patch::Apply(to_dynamic(example)))
            .await
            .unwrap_or_else(|e| panic!("{}: refused by the API server: {e}", example.file_name()));
        let returned = serde_json::to_value(&applied).expect("to JSON");
        let mut lost = Vec::new();
        missing_leaves(&example.object["spec"], &returned["spec"], "spec", &mut lost);
        assert!(lost.is_empty(), "{}: the server pruned or changed {lost:?}", example.file_name());
    }

    // Printer columns through the Table API, as `kubectl get` shows them.
    for (plural, crd) in api::crds() {
        let kind = crd.spec.names.kind.clone();
        let ar = api_resource(&kind);
        let url = if crd.spec.scope == "Namespaced" {
            format!("/apis/{}/namespaces/{ns}/{plural}", ar.api_version)
        } else {
            format!("/apis/{}/{plural}", ar.api_version)
        };
        let request = http::Request::get(&url)
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .expect("request");
        let table: Value = client.request(request).await.expect("table");
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .expect("columnDefinitions")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        let mut expected = vec!["Name"];
        let printer = crd.spec.versions[0].additional_printer_columns.as_deref().unwrap_or_default();
        expected.extend(printer.iter().map(|c| c.name.as_str()));
        assert_eq!(columns, expected, "{plural}: printer columns");
        assert_eq!(columns[1], "Ready", "{plural}: Ready leads");
        let rows = table["rows"].as_array().expect("rows");
        let names: Vec<&str> = examples.iter().filter(|e| e.kind() == kind).map(Example::name).collect();
        for name in &names {
            assert!(rows.iter().any(|r| r["cells"][0] == *name), "{plural}: no row for {name}");
        }
        println!("{plural}: columns {columns:?}, {} rows", rows.len());
    }
    // The full endpoint shows its tier and desired replicas in its row.
    let request = http::Request::get(format!("/apis/fhiroperator.io/v1alpha1/namespaces/{ns}/fhirendpoints/patients"))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .expect("request");
    let table: Value = client.request(request).await.expect("table");
    let cells = &table["rows"][0]["cells"];
    assert_eq!(cells[2], "gold", "Tier column");
    assert_eq!(cells[3], 2, "Replicas column");
}

#[tokio::test]
async fn every_invalid_example_is_refused_naming_the_field() {
    let client = cluster().client().await;
    install_crds(&client).await.expect("install CRDs");
    let ns = namespace(&client, "invalid").await.expect("namespace");
    let version = client.apiserver_version().await.expect("version");
    let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
    let server_runs_cel = minor >= 25;
    let mut refused_by_schema = 0;
    for example in examples::invalid().expect("invalid examples") {
        let (by, field) = example.refusal.clone().expect("refusal header");
        let api = dynamic_api(&client, &ns, example.kind());
        let result = api.create(&PostParams::default(), &to_dynamic(&example)).await;
        if by == RefusedBy::Cel && !server_runs_cel {
            // v1.20 drops x-kubernetes-validations: offline_schema.rs proves
            // these rules with kube-cel; here, just clean up.
            println!(
                "{}: CEL-only, not enforced by {}; refused in offline_schema",
                example.file_name(),
                version.git_version
            );
            if result.is_ok() {
                api.delete(example.name(), &Default::default()).await.expect("cleanup");
            }
            continue;
        }
        match result {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: expected 422 Invalid, got {status:?}", example.file_name());
                assert!(
                    status.message.contains(&field),
                    "{}: the refusal must name {field}: {}",
                    example.file_name(),
                    status.message
                );
                println!("{}: refused: {}", example.file_name(), status.message);
                refused_by_schema += 1;
            }
            Ok(obj) => panic!(
                "{}: accepted {}, must be refused",
                example.file_name(),
                obj.meta().name.clone().unwrap_or_default()
            ),
            Err(e) => panic!("{}: unexpected error {e}", example.file_name()),
        }
    }
    assert!(refused_by_schema >= 10, "expected at least 10 schema refusals, got {refused_by_schema}");
}
