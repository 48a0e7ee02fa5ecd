//! The Helm chart, with Helm's own Go SDK (`e2e/helm.py`) and a real
//! kube-apiserver: it lints clean, renders with default and other values,
//! its Deployment meets Pod Security "restricted", its RBAC is exactly
//! `operator/src/rbac.rs`, its values schema refuses wrong types, the API
//! server accepts what it renders (dry run, then install, upgrade,
//! uninstall), and the operator works with nothing but the chart's
//! namespaced RBAC while what that RBAC does not grant stays forbidden.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fhir_operator::api::{FhirEndpoint, RateLimitTier};
use fhir_operator_e2e::helm::{self, HelmError};
use fhir_operator_e2e::operator::Operator;
use fhir_operator_e2e::{client_for, cluster, examples, install_crds, mark_pods_ready, namespace, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// Lint findings this chart accepts, each for a reason: the project has no
/// logo to point `icon` at.
const ACCEPTED_LINT: &[&str] = &["icon is recommended"];

/// Non-default values: a namespaced install, the ServiceMonitor on, another
/// image, one replica more.
fn custom_values(namespaces: &[&str]) -> Value {
    json!({
        "watchNamespaces": namespaces,
        "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}},
        "image": {"repository": "registry.example/platform/fhir-operator", "tag": "9.9.9"},
        "gatewayImage": "registry.example/nginx-unprivileged:1.27",
        "replicaCount": 3,
        "watchStallLimit": "5m",
        "keyHints": {"enabled": false},
        "networkPolicy": {"extraEgress": [
            {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]},
    })
}

fn render(values: &Value) -> Vec<Value> {
    let manifests = helm::render(values, "fhir", "fhir-system").expect("bridge").unwrap_or_else(|e| {
        panic!("Helm refused to render {values}: {}: {}", e.kind, e.message);
    });
    let yaml = manifests.into_iter().filter(|(path, _)| path.ends_with(".yaml")).map(|(_, text)| text);
    helm::objects(yaml).expect("rendered YAML")
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    match of_kind(objects, kind).as_slice() {
        [only] => only,
        found => panic!("expected one {kind}, rendered {}", found.len()),
    }
}

/// (apiGroup, resource, verb) of every rule.
fn triples(rules: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        let list = |key: &str| -> Vec<String> {
            rule[key].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

fn rbac_rs_triples() -> BTreeSet<(String, String, String)> {
    triples(&serde_json::to_value(fhir_operator::rbac::policy_rules()).expect("rules as JSON"))
}

fn assert_no_wildcard(objects: &[Value]) {
    for role in of_kind(objects, "ClusterRole").into_iter().chain(of_kind(objects, "Role")) {
        for (group, resource, verb) in triples(&role["rules"]) {
            assert!(
                ![&group, &resource, &verb].iter().any(|s| s.contains('*')),
                "{}: wildcard in ({group:?}, {resource:?}, {verb:?})",
                role["metadata"]["name"]
            );
        }
    }
}

#[test]
fn helm_lint_finds_no_errors_and_no_warnings() {
    for values in [json!({}), custom_values(&["clinic-a", "clinic-b"])] {
        let report = helm::lint(&values, true).expect("lint runs");
        assert_eq!(report["errors"], json!([]), "helm lint --strict with {values}: {report:#}");
        for message in report["messages"].as_array().into_iter().flatten() {
            let text = message["error"].as_str().unwrap_or_default();
            assert!(ACCEPTED_LINT.contains(&text), "unexpected lint finding with {values}: {message}");
        }
        println!(
            "helm lint --strict with {values}: {} finding(s), all accepted",
            report["messages"].as_array().map_or(0, Vec::len)
        );
    }
}

#[test]
fn default_values_render_a_pod_security_restricted_deployment() {
    let objects = render(&json!({}));
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert!(pod["securityContext"]["runAsUser"].as_i64().is_some_and(|uid| uid > 0), "a numeric non-root uid");
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null(), "no capability added");
    assert!(sc["privileged"].is_null() || sc["privileged"] == false);
    assert!(pod["hostNetwork"].is_null() && pod["hostPID"].is_null() && pod["volumes"].is_null());

    // The image defaults to the chart's appVersion, which is the crate's version.
    let image = format!("fhir-operator:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(c["image"], image.as_str());
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(args[0], "run");
    assert!(args.contains(&"--metrics-addr=0.0.0.0:8080"), "{args:?}");
    assert!(args.contains(&"--watch-stall-limit=2m"), "{args:?}");
    assert!(args.contains(&format!("--sidecar-image={image}").as_str()), "{args:?}");
    assert!(!args.iter().any(|a| a.starts_with("--namespace")), "cluster-wide by default: {args:?}");
    let pod_name = c["env"].as_array().unwrap().iter().find(|e| e["name"] == "POD_NAME").expect("POD_NAME");
    assert_eq!(pod_name["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], "metrics");
    }
    assert_eq!(c["ports"][0], json!({"name": "metrics", "containerPort": 8080, "protocol": "TCP"}));
    assert_eq!(c["ports"][1], json!({"name": "key-hints", "containerPort": 8081, "protocol": "TCP"}));
    // Key hints: the URL is the hint Service's, the labels select these pods.
    for expected in [
        "--key-hints-addr=0.0.0.0:8081",
        "--key-hints-url=http://fhir-fhir-operator-key-hints.fhir-system.svc:8081/v1/key-hints",
    ] {
        assert!(args.contains(&expected), "{expected} missing from {args:?}");
    }
    let selector = &one(&objects, "Deployment")["spec"]["selector"]["matchLabels"];
    let labels = args.iter().find_map(|a| a.strip_prefix("--operator-pod-labels=")).expect("--operator-pod-labels");
    let labels: serde_json::Map<String, Value> = labels
        .split(',')
        .map(|pair| pair.split_once('=').expect("k=v"))
        .map(|(k, v)| (k.to_owned(), json!(v)))
        .collect();
    assert_eq!(&Value::Object(labels), selector, "the hint peer is the operator's own pods");

    let services = of_kind(&objects, "Service");
    let service = |suffix: &str| {
        *services
            .iter()
            .find(|s| s["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(suffix)))
            .unwrap_or_else(|| panic!("no Service named *{suffix}"))
    };
    assert_eq!(service("-metrics")["spec"]["ports"][0]["targetPort"], "metrics");
    let hints = service("-key-hints");
    assert_eq!(hints["spec"]["ports"][0]["targetPort"], "key-hints");
    assert_eq!(hints["spec"]["selector"], *selector);
    assert!(of_kind(&objects, "ServiceMonitor").is_empty(), "the ServiceMonitor is off by default");
    assert_eq!(one(&objects, "PodDisruptionBudget")["spec"]["minAvailable"], 1);

    // Its own NetworkPolicy: in, only the metrics port and, from gateway
    // pods, the hint port; out, only DNS and the API server.
    let policy = &one(&objects, "NetworkPolicy")["spec"];
    assert_eq!(policy["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(
        policy["ingress"],
        json!([{"ports": [{"port": 8080, "protocol": "TCP"}]},
               {"ports": [{"port": 8081, "protocol": "TCP"}],
                "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "fhir-endpoint"}}}]}])
    );
    let egress_ports: BTreeSet<i64> = policy["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap().iter().filter_map(|p| p["port"].as_i64()))
        .collect();
    assert_eq!(egress_ports, BTreeSet::from([53, 443, 6443]));
}

#[test]
fn cluster_wide_rbac_is_exactly_rbac_rs_without_wildcards() {
    let objects = render(&json!({}));
    assert_no_wildcard(&objects);
    assert!(of_kind(&objects, "Role").is_empty(), "cluster-wide: no Roles");
    let role = one(&objects, "ClusterRole");
    let rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule> =
        serde_json::from_value(role["rules"].clone()).expect("PolicyRules");
    assert_eq!(rules, fhir_operator::rbac::policy_rules(), "the ClusterRole is rbac.rs, rule for rule");
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let account = one(&objects, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "fhir-system");
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
}

#[test]
fn non_default_values_render_a_namespaced_install_with_a_service_monitor() {
    let objects = render(&custom_values(&["clinic-a", "clinic-b"]));
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/platform/fhir-operator:9.9.9");
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for expected in [
        "--namespace=clinic-a,clinic-b",
        "--sidecar-image=registry.example/platform/fhir-operator:9.9.9",
        "--gateway-image=registry.example/nginx-unprivileged:1.27",
        "--watch-stall-limit=5m",
    ] {
        assert!(args.contains(&expected), "{expected} missing from {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--key-hints") || a.starts_with("--operator-pod-labels")), "{args:?}");
    assert_eq!(of_kind(&objects, "Service").len(), 1, "no hint Service without key hints");
    let policy = &one(&objects, "NetworkPolicy")["spec"];
    assert_eq!(policy["ingress"].as_array().map(Vec::len), Some(1), "no hint port without key hints");
    assert_eq!(
        policy["egress"][0],
        json!({"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 443, "protocol": "TCP"}]}),
        "networkPolicy.extraEgress: the operator reaches a JWKS URL or an S3 audit destination"
    );
    let monitor = one(&objects, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");

    // RBAC: Roles in the watched namespaces; a ClusterRole for cluster-scoped kinds only.
    assert_no_wildcard(&objects);
    let roles = of_kind(&objects, "Role");
    let namespaces: BTreeSet<&str> = roles.iter().filter_map(|r| r["metadata"]["namespace"].as_str()).collect();
    // The watched namespaces, and the release's own for the leader Lease.
    assert_eq!(namespaces, BTreeSet::from(["clinic-a", "clinic-b", "fhir-system"]));
    let bindings = of_kind(&objects, "RoleBinding");
    assert_eq!(bindings.len(), roles.len());
    let cluster_role = one(&objects, "ClusterRole");
    for (group, resource, _) in triples(&cluster_role["rules"]) {
        assert_eq!(
            fhir_operator::chart::placement(&group, &resource),
            fhir_operator::chart::Placement::Cluster,
            "the namespaced install grants {group}/{resource} cluster-wide"
        );
    }
    assert!(!triples(&cluster_role["rules"]).iter().any(|(_, r, _)| r == "secrets"), "no cluster-wide Secrets");
    // Together they grant exactly rbac.rs, no more and no less.
    let mut granted = triples(&cluster_role["rules"]);
    let watched: Vec<&Value> = roles.iter().copied().filter(|r| r["metadata"]["namespace"] != "fhir-system").collect();
    for role in &watched {
        let mine = triples(&role["rules"]);
        assert_eq!(mine, triples(&watched[0]["rules"]), "every watched namespace gets the same rules");
        granted.extend(mine);
    }
    let own: Vec<&Value> = roles.iter().copied().filter(|r| r["metadata"]["namespace"] == "fhir-system").collect();
    assert_eq!(own.len(), 1, "one Role in the release namespace");
    for (group, resource, _) in triples(&own[0]["rules"]) {
        assert_eq!((group.as_str(), resource.as_str()), ("coordination.k8s.io", "leases"), "only the Lease there");
    }
    granted.extend(triples(&own[0]["rules"]));
    assert_eq!(granted, rbac_rs_triples());
}

#[test]
fn the_values_schema_refuses_wrong_types_naming_the_field() {
    let cases = [
        (json!({"replicaCount": "two"}), "/replicaCount"),
        (json!({"replicaCount": 0}), "/replicaCount"),
        (json!({"watchNamespaces": "clinic-a"}), "/watchNamespaces"),
        (json!({"watchNamespaces": ["Not_A_Namespace"]}), "/watchNamespaces/0"),
        (json!({"image": {"pullPolicy": "Sometimes"}}), "/image/pullPolicy"),
        (json!({"serviceMonitor": {"enabled": "yes"}}), "/serviceMonitor/enabled"),
        (json!({"networkPolicy": {"apiServer": {"ports": [70000]}}}), "/networkPolicy/apiServer/ports/0"),
        (json!({"replicas": 2}), "replicas"),
    ];
    for (values, field) in cases {
        match helm::render(&values, "fhir", "fhir-system").expect("bridge") {
            Ok(_) => panic!("the schema accepted {values}"),
            Err(HelmError { kind, message }) => {
                assert_eq!(kind, "HelmValuesError", "{values}: {message}");
                assert!(message.contains(field), "{values}: the refusal should name {field}: {message}");
            }
        }
    }
}

// --- against the real API server ------------------------------------------

/// Creates `object` as it is (`dry_run`: with `?dryRun=All`, so the API
/// server validates and admits it, and stores nothing).
async fn create(client: &Client, object: &Value, dry_run: bool) {
    let obj: DynamicObject = serde_json::from_value(object.clone()).expect("object");
    let types = obj.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("gvk");
    let (resource, caps) = pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{gvk:?} not served: {e}"));
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), &obj.namespace().expect("namespace"), &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let params = PostParams { dry_run, field_manager: Some("fhir-operator-chart-test".into()) };
    api.create(&params, &obj)
        .await
        .unwrap_or_else(|e| panic!("the API server refused {} {}: {e}", types.kind, obj.name_any()));
}

async fn server_dry_run(client: &Client, objects: &[Value]) {
    for object in objects {
        create(client, object, true).await;
    }
}

/// The manifest Helm would install, rendered with the cluster's own API
/// versions (e.g. policy/v1beta1 PodDisruptionBudgets on 1.20).
fn server_manifest(values: &Value, name: &str, namespace: &str) -> Vec<Value> {
    let release = helm::install(cluster().kubeconfig(), values, name, namespace, Some("server")).expect("dry run");
    helm::objects([release["manifest"].as_str().expect("manifest")]).expect("manifest YAML")
}

async fn create_crd(client: &Client, crd: CustomResourceDefinition) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.create(&PostParams::default(), &crd).await.unwrap_or_else(|e| panic!("CRD {name}: {e}"));
    wait_for(&format!("CRD {name} established"), WAIT, || {
        let api = api.clone();
        let name = name.clone();
        async move {
            let crd = api.get(&name).await?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            Ok(conditions.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

async fn deployment_replicas(client: &Client, namespace: &str, name: &str) -> Option<i32> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.expect("get Deployment").map(|d| d.spec.and_then(|s| s.replicas).unwrap_or(1))
}

#[tokio::test]
async fn the_api_server_accepts_the_chart_dry_run_install_upgrade_uninstall() {
    let cluster = cluster();
    let client = cluster.client().await;
    let kubeconfig = cluster.kubeconfig();
    println!("chart against {}", cluster.description());

    // Default values: server-side dry run of every object, then a real install
    // (which also creates the CRDs from the chart's crds/).
    let release_ns = namespace(&client, "chart").await.expect("namespace");
    let objects = server_manifest(&json!({}), "fhir", &release_ns);
    server_dry_run(&client, &objects).await;
    println!("dry run: the API server accepted all {} objects of the default install", objects.len());
    helm::install(kubeconfig, &json!({}), "fhir", &release_ns, None).expect("helm install");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (plural, _) in fhir_operator::api::crds() {
        crds.get(&format!("{plural}.{}", fhir_operator::api::GROUP)).await.expect("CRD installed by Helm");
    }
    assert_eq!(deployment_replicas(&client, &release_ns, "fhir-fhir-operator").await, Some(2));

    // Non-default values, a second release: namespaced, with a ServiceMonitor.
    use kube::CustomResourceExt;
    create_crd(&client, fhir_operator::fhirendpoint::monitoring::ServiceMonitor::crd()).await;
    let watched = [namespace(&client, "chart-a").await.unwrap(), namespace(&client, "chart-b").await.unwrap()];
    let watched: Vec<&str> = watched.iter().map(String::as_str).collect();
    let other_ns = namespace(&client, "chart-custom").await.expect("namespace");
    let values = custom_values(&watched);
    let objects = server_manifest(&values, "custom", &other_ns);
    assert_eq!(of_kind(&objects, "ServiceMonitor").len(), 1);
    server_dry_run(&client, &objects).await;
    println!("dry run: the API server accepted all {} objects of the namespaced install", objects.len());
    helm::install(kubeconfig, &values, "custom", &other_ns, None).expect("helm install (namespaced)");
    for ns in &watched {
        let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), ns);
        roles.get("custom-fhir-operator").await.expect("a Role in each watched namespace");
    }

    // Upgrade, then uninstall: the objects go, the CRDs stay (Helm never deletes them).
    helm::upgrade(kubeconfig, &json!({"replicaCount": 4}), "fhir", &release_ns).expect("helm upgrade");
    assert_eq!(deployment_replicas(&client, &release_ns, "fhir-fhir-operator").await, Some(4));
    for (name, ns) in [("fhir", release_ns.as_str()), ("custom", other_ns.as_str())] {
        helm::uninstall(kubeconfig, name, ns).expect("helm uninstall");
        assert_eq!(
            deployment_replicas(&client, ns, &format!("{name}-fhir-operator")).await,
            None,
            "{name} uninstalled"
        );
    }
    crds.get(&format!("fhirendpoints.{}", fhir_operator::api::GROUP)).await.expect("CRDs are kept");
}

fn ready(conditions: &[Condition]) -> bool {
    conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The operator as the token user `fhir-operator`, bound by nothing but the
/// chart's RBAC for a namespaced install of namespace A: it reconciles an
/// endpoint in A and a tier (cluster-scoped), and is refused Secrets and
/// endpoints in namespace B.
#[tokio::test]
async fn the_operator_works_with_only_the_charts_namespaced_rbac() {
    let cluster = cluster();
    let client = cluster.client().await;
    install_crds(&client).await.expect("CRDs");
    let ns_a = namespace(&client, "chart-a").await.expect("namespace");
    let ns_b = namespace(&client, "chart-b").await.expect("namespace");
    let release_ns = namespace(&client, "chart-op").await.expect("namespace");

    // The chart's Roles, ClusterRoles and bindings, bound to the operator's user.
    let objects = render(&json!({"watchNamespaces": [ns_a]}));
    let kinds = ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"];
    let mut rbac: Vec<Value> = objects.into_iter().filter(|o| kinds.iter().any(|k| o["kind"] == *k)).collect();
    for object in &mut rbac {
        if object["kind"].as_str().is_some_and(|k| k.ends_with("Binding")) {
            object["subjects"] = json!([{"kind": "User", "name": fhir_operator_e2e::control_plane::OPERATOR_USER,
                                         "apiGroup": "rbac.authorization.k8s.io"}]);
        }
        if object["metadata"]["namespace"] == "fhir-system" {
            object["metadata"]["namespace"] = json!(release_ns);
        }
    }
    for object in &rbac {
        create(&client, object, false).await;
    }
    println!("bound {} chart RBAC objects to the user fhir-operator; nothing else", rbac.len());

    // An endpoint in B, which the operator does not watch, comes first.
    let example = |kind: &str, name: &str| {
        let found = examples::valid().unwrap().into_iter().find(|e| e.kind() == kind && e.name() == name);
        found.unwrap_or_else(|| panic!("no example {kind} {name}")).object
    };
    let apply = PatchParams::apply("fhir-operator-chart-test");
    Api::<FhirEndpoint>::namespaced(client.clone(), &ns_b)
        .patch("trial", &apply, &Patch::Apply(example("FhirEndpoint", "trial")))
        .await
        .expect("endpoint in B");
    // With leader election on its Lease in the release namespace, as the
    // chart runs it (the chart's own Role grants leases there only).
    let lease_ns = format!("--lease-namespace={release_ns}");
    let operator =
        Operator::start(cluster.operator_kubeconfig(), &["--namespace", &ns_a, "--leader-elect=true", &lease_ns])
            .expect("the operator starts and is ready");

    let tiers: Api<RateLimitTier> = Api::all(client.clone());
    tiers.patch("bronze", &apply, &Patch::Apply(example("RateLimitTier", "bronze"))).await.expect("tier");
    let endpoints: Api<FhirEndpoint> = Api::namespaced(client.clone(), &ns_a);
    endpoints.patch("trial", &apply, &Patch::Apply(example("FhirEndpoint", "trial"))).await.expect("endpoint in A");
    let ep = wait_for("the endpoint in A Ready (pods marked ready, no kubelet)", WAIT, || {
        let (client, endpoints, ns) = (client.clone(), endpoints.clone(), ns_a.clone());
        async move {
            mark_pods_ready(&client, &ns, "fhiroperator.io/endpoint=trial").await?;
            let ep = endpoints.get("trial").await?;
            let conditions = ep.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
            Ok(ready(&conditions).then_some(ep))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- operator log ---\n{}", operator.logs()));
    assert_eq!(ep.status.as_ref().and_then(|s| s.observed_generation), ep.metadata.generation);
    wait_for("the tier's status (cluster-scoped, through the ClusterRole)", WAIT, || {
        let tiers = tiers.clone();
        async move {
            let tier = tiers.get("bronze").await?;
            let observed = tier.status.as_ref().and_then(|s| s.observed_generation) == tier.metadata.generation;
            Ok(tier.status.filter(|s| observed && ready(&s.conditions)).map(|_| ()))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- operator log ---\n{}", operator.logs()));
    let b = Api::<FhirEndpoint>::namespaced(client.clone(), &ns_b).get("trial").await.unwrap();
    assert!(b.status.is_none(), "the endpoint in the unwatched namespace B was reconciled");

    // With the operator's own credentials: its Secrets in A yes, anything in B no.
    Api::<Secret>::namespaced(client.clone(), &ns_b)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta { name: Some("not-the-operators".into()), ..Default::default() },
                string_data: Some(BTreeMap::from([("password".to_owned(), "hunter2".to_owned())])),
                ..Default::default()
            },
        )
        .await
        .expect("a Secret in B");
    let as_operator = client_for(cluster.operator_kubeconfig()).await.expect("operator client");
    Api::<Secret>::namespaced(as_operator.clone(), &ns_a).get("trial-tls").await.expect("its own TLS Secret in A");
    let forbidden = |result: Result<(), kube::Error>, what: &str| match result {
        Err(kube::Error::Api(status)) if status.code == 403 => println!("forbidden, as it should be: {what}"),
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    };
    forbidden(
        Api::<Secret>::namespaced(as_operator.clone(), &ns_b).get("not-the-operators").await.map(|_| ()),
        "get a Secret in the unwatched namespace B",
    );
    forbidden(
        Api::<Secret>::all(as_operator.clone()).list(&Default::default()).await.map(|_| ()),
        "list Secrets cluster-wide",
    );
    forbidden(
        Api::<FhirEndpoint>::namespaced(as_operator.clone(), &ns_b).get("trial").await.map(|_| ()),
        "get a FhirEndpoint in B",
    );
}
