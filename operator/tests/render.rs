//! `fhir-operator render` on the examples: golden snapshots of every
//! endpoint's children, determinism, clear errors for missing references,
//! and the Pod Security Standard "restricted" on every pod template.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fhir-operator");

fn examples() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()))
        .join("..")
        .join("examples")
}

fn render(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).arg("render").args(args).output().expect("run fhir-operator render");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn all_examples() -> String {
    let dir = examples();
    let (ok, out, err) = render(&["-f", dir.to_str().unwrap()]);
    assert!(ok, "render of examples/ failed: {err}");
    out
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn every_example_endpoint_renders_its_children() {
    let out = all_examples();
    // One snapshot per endpoint keeps reviews readable.
    for section in out.split("# FhirEndpoint ").skip(1) {
        let id = section.lines().next().unwrap().trim().replace('/', "_");
        insta::assert_snapshot!(format!("children_{id}"), format!("# FhirEndpoint {section}"));
    }
    let kinds: Vec<String> = documents(&out).iter().map(|d| d["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "Deployment").count(), 2, "{kinds:?}");
}

#[test]
fn render_is_byte_for_byte_deterministic() {
    assert_eq!(all_examples(), all_examples());
    // File order does not matter either.
    let dir = examples();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    files.reverse();
    let mut args = Vec::new();
    for f in &files {
        args.extend(["-f", f.as_str()]);
    }
    let (ok, reversed, err) = render(&args);
    assert!(ok, "{err}");
    assert_eq!(reversed, all_examples());
}

#[test]
fn a_missing_tier_is_named_unless_placeholders_are_asked_for() {
    let full = examples().join("fhirendpoint-full.yaml");
    let krs = examples().join("keyrotationschedule-full.yaml");
    let (ok, _, err) = render(&["-f", full.to_str().unwrap(), "-f", krs.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("FhirEndpoint default/patients")
            && err.contains("\"gold\"")
            && err.contains("spec.rateLimit.tier"),
        "{err}"
    );
    let tier = examples().join("ratelimittier-full.yaml");
    let (ok, _, err) = render(&["-f", full.to_str().unwrap(), "-f", tier.to_str().unwrap()]);
    assert!(!ok && err.contains("KeyRotationSchedule \"patients-clients\""), "the key schedule is named too: {err}");
    let (ok, out, err) = render(&["-f", full.to_str().unwrap(), "--allow-missing"]);
    assert!(ok, "{err}");
    assert!(out.contains("kind: Deployment"));
}

#[test]
fn documents_come_from_stdin_too_and_invalid_specs_name_the_field() {
    let invalid =
        std::fs::read_to_string(examples().join("invalid").join("fhirendpoint-empty-access-peer.yaml")).unwrap();
    let (ok, _, err) = render_stdin(&["-n", "clinic"], &invalid);
    assert!(!ok);
    assert!(err.contains("FhirEndpoint clinic/invalid-access-peer: spec.access.from[0]"), "{err}");

    let (ok, _, err) = render(&["-f", "/nonexistent/endpoint.yaml"]);
    assert!(!ok && err.contains("/nonexistent/endpoint.yaml"), "{err}");
}

/// Each rule of the Pod Security Standard "restricted" (v1.20+ profile),
/// checked on every container of every rendered pod template.
#[test]
fn every_pod_template_meets_pod_security_restricted() {
    let out = all_examples();
    let mut checked = 0;
    for doc in documents(&out).into_iter().filter(|d| d["kind"] == "Deployment") {
        let deployment: Deployment = serde_json::from_value(doc).unwrap();
        let name = deployment.metadata.name.clone().unwrap();
        let pod: PodSpec = deployment.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.clone().unwrap_or_default();
        assert_eq!(psc.run_as_non_root, Some(true), "{name}: pod runAsNonRoot");
        assert!(psc.run_as_user.is_none_or(|u| u != 0), "{name}: pod runAsUser is not root");
        assert_eq!(
            psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault"),
            "{name}: pod seccomp"
        );
        assert!(
            pod.host_network.is_none_or(|h| !h) && pod.host_pid.is_none_or(|h| !h) && pod.host_ipc.is_none_or(|h| !h)
        );
        for volume in pod.volumes.iter().flatten() {
            let allowed = volume.config_map.is_some()
                || volume.secret.is_some()
                || volume.empty_dir.is_some()
                || volume.projected.is_some()
                || volume.downward_api.is_some()
                || volume.persistent_volume_claim.is_some();
            assert!(allowed, "{name}: volume {} is of a type restricted forbids", volume.name);
        }
        assert_eq!(pod.automount_service_account_token, Some(false), "{name}: no service account token");
        let containers: Vec<&Container> = pod.containers.iter().chain(pod.init_containers.iter().flatten()).collect();
        for c in containers {
            let sc = c.security_context.clone().unwrap_or_default();
            let who = format!("{name}/{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{who}: allowPrivilegeEscalation");
            assert!(sc.privileged.is_none_or(|p| !p), "{who}: privileged");
            let caps = sc.capabilities.clone().unwrap_or_default();
            assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{who}: drop ALL");
            assert!(caps.add.is_none_or(|a| a.is_empty() || a == ["NET_BIND_SERVICE"]), "{who}: added capabilities");
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{who}: read-only root filesystem");
            assert!(sc.run_as_non_root != Some(false), "{who}: runAsNonRoot");
            assert!(sc.run_as_user.is_none_or(|u| u != 0), "{who}: runAsUser");
            assert!(sc.seccomp_profile.is_none_or(|s| s.type_ == "RuntimeDefault" || s.type_ == "Localhost"));
            for port in c.ports.iter().flatten() {
                assert!(port.host_port.is_none(), "{who}: hostPort");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 7, "2 endpoints × 3 containers, and the full one's token verifier, checked");
}

/// `fhir-operator render -f - ARGS` with `input` on stdin.
fn render_stdin(args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(["render", "-f", "-"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Renders one FhirEndpoint given as JSON, in namespace clinical.
fn render_value(endpoint: &Value) -> (bool, String, String) {
    render_stdin(&["-n", "clinical", "--allow-missing"], &serde_yaml::to_string(endpoint).unwrap())
}

fn endpoint_with(spec: Value) -> Value {
    serde_json::json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": "hostile"}, "spec": spec})
}

/// Quotes, newlines, `&`, `?`, `/`, `@`, `#`, `%`, unicode and over-long
/// values in every field that reaches a URL, an environment variable or a
/// volume: `render` refuses each, naming the field, and prints nothing.
#[test]
fn hostile_values_are_refused_by_render_naming_the_field() {
    let hostile = [
        "evil.example/fhir?sslmode=disable&x=",
        "db\"; DROP",
        "db'x",
        "db\nsslmode=disable",
        "user@db",
        "db#frag",
        "db%2F",
        "dätabase",
        "db x",
    ];
    let long = "a".repeat(300);
    let database = |field: &str, value: &str| {
        let mut db = serde_json::json!({"host": "db.example", "name": "fhir", "credentialsSecret": "creds"});
        db[field] = Value::from(value);
        serde_json::json!({"database": db})
    };
    let mut cases: Vec<(&str, Value)> = Vec::new();
    for value in hostile.iter().copied().chain([long.as_str()]) {
        cases.push(("spec.database.host", database("host", value)));
        cases.push(("spec.database.name", database("name", value)));
        cases.push(("spec.database.credentialsSecret", database("credentialsSecret", value)));
        cases.push(("spec.database.caSecret", database("caSecret", value)));
        cases.push(("spec.server.image", serde_json::json!({"server": {"image": value}})));
        cases.push(("spec.publicUrl", serde_json::json!({"publicUrl": format!("https://x.example/fhir{value}")})));
        cases.push(("spec.rateLimit.tier", serde_json::json!({"rateLimit": {"tier": value}})));
        cases.push(("spec.tls.secretName", serde_json::json!({"tls": {"secretName": value}})));
    }
    cases.push(("spec.server.image", serde_json::json!({"server": {"image": "a b"}})));
    cases.push(("spec.publicUrl", serde_json::json!({"publicUrl": "https://user:pw@x.example/fhir"})));
    cases.push(("spec.publicUrl", serde_json::json!({"publicUrl": "https://x.example/fhir?a=b"})));
    cases.push((
        "spec.database.port",
        serde_json::json!({"database": {"host": "db", "name": "f", "credentialsSecret": "c", "port": 70000}}),
    ));
    for (field, spec) in cases {
        let (ok, out, err) = render_value(&endpoint_with(spec.clone()));
        assert!(!ok && out.is_empty(), "{field}: rendered {spec}");
        assert!(err.contains(&format!("FhirEndpoint clinical/hostile: {field}")), "{field} for {spec}: {err}");
    }
}

/// Flavor helios (the Helios FHIR Server, hfs): its own environment, the
/// public URL as HFS_BASE_URL, the database as separate HFS_PG_* values with
/// the credentials from the Secret, and the CA mounted.
#[test]
fn helios_flavor_renders_its_own_environment() {
    let endpoint = serde_json::json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
    "metadata": {"name": "patients"},
    "spec": {
        "publicUrl": "https://patients.clinical.example",
        "server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7"},
        "database": {"host": "fd00::5", "name": "fhir", "credentialsSecret": "patients-db",
            "caSecret": "patients-db-ca"},
    }});
    let (ok, out, err) = render_value(&endpoint);
    assert!(ok, "{err}");
    insta::assert_snapshot!("children_helios", out);
    let deployment = documents(&out).into_iter().find(|d| d["kind"] == "Deployment").unwrap();
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let value = |name: &str| env.as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    assert_eq!(value("HFS_BASE_URL").unwrap()["value"], "https://patients.clinical.example");
    assert_eq!(value("HFS_PG_HOST").unwrap()["value"], "fd00::5");
    assert_eq!(value("HFS_PG_PASSWORD").unwrap()["valueFrom"]["secretKeyRef"]["name"], "patients-db");
    assert!(value("HFS_DATABASE_URL").is_none() && value("SPRING_DATASOURCE_URL").is_none());
}
