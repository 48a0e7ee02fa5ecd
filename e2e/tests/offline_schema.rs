//! Offline checks of the generated CRD schemas against `examples/`: the CEL
//! rules (evaluated by kube-cel, since v1.20 API servers drop them), the
//! transition (immutability) rules, and that every example field exists in
//! the Rust types. No cluster needed.

use fhir_operator::api;
use fhir_operator_e2e::examples::{self, Example, RefusedBy, missing_leaves};
use serde_json::{Value, json};

fn schema_for(kind: &str) -> Value {
    let (_, crd) = api::crds()
        .into_iter()
        .find(|(_, crd)| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for kind {kind}"));
    let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("schema");
    serde_json::to_value(schema).expect("schema to JSON")
}

fn cel_errors(object: &Value, old: Option<&Value>) -> Vec<(String, String)> {
    let kind = object["kind"].as_str().expect("kind");
    match kube_cel::validate(&schema_for(kind), object, old) {
        Ok(()) => Vec::new(),
        // A rule's own fieldPath comes back as written (`.metadata.name`).
        Err(errors) => errors
            .into_vec()
            .into_iter()
            .map(|e| (e.field_path.trim_start_matches('.').to_owned(), e.message))
            .collect(),
    }
}

#[test]
fn valid_examples_pass_every_cel_rule() {
    for example in examples::valid().unwrap() {
        let errors = cel_errors(&example.object, None);
        assert!(errors.is_empty(), "{}: CEL refused a valid example: {errors:?}", example.file_name());
        // Updating an object to itself must pass the transition rules too.
        let errors = cel_errors(&example.object, Some(&example.object));
        assert!(errors.is_empty(), "{}: transition rules refused a no-op update: {errors:?}", example.file_name());
    }
}

#[test]
fn invalid_examples_for_cel_are_refused_naming_the_field() {
    let mut checked = 0;
    for example in examples::invalid().unwrap() {
        let Some((RefusedBy::Cel, field)) = &example.refusal else { continue };
        let errors = cel_errors(&example.object, None);
        assert!(
            errors.iter().any(|(path, msg)| path.starts_with(field.as_str()) && !msg.is_empty()),
            "{}: expected a CEL refusal at {field}, got {errors:?}",
            example.file_name()
        );
        println!("{}: refused by CEL at {field}: {}", example.file_name(), errors[0].1);
        checked += 1;
    }
    assert!(checked >= 4, "expected at least 4 CEL-only invalid examples, found {checked}");
}

/// Every field an example sets exists in the Rust types: nothing a user
/// copies from `examples/` is silently dropped.
#[test]
fn valid_examples_round_trip_through_the_types() {
    for example in examples::valid().unwrap() {
        let typed = roundtrip(&example);
        let mut lost = Vec::new();
        missing_leaves(&example.object["spec"], &typed["spec"], "spec", &mut lost);
        assert!(lost.is_empty(), "{}: fields lost by the types: {lost:?}", example.file_name());
    }
}

/// What the schema cannot check, the operator does: every example it ships
/// must pass that too (a key schedule whose grace period is not shorter
/// than its interval is refused as InvalidSpec, naming spec.gracePeriod).
#[test]
fn valid_example_key_schedules_pass_the_operators_own_checks() {
    let schedules: Vec<Example> =
        examples::valid().unwrap().into_iter().filter(|e| e.kind() == "KeyRotationSchedule").collect();
    assert!(schedules.len() >= 3);
    for example in schedules {
        let krs: api::KeyRotationSchedule = serde_json::from_value(example.object.clone()).unwrap();
        if let Err(e) = fhir_operator::keyrotation::rotation::settings(&krs.spec) {
            panic!("{}: {e}", example.file_name());
        }
    }
}

fn roundtrip(example: &Example) -> Value {
    fn through<T: serde::de::DeserializeOwned + serde::Serialize>(obj: Value) -> serde_json::Result<Value> {
        serde_json::to_value(serde_json::from_value::<T>(obj)?)
    }
    let obj = example.object.clone();
    let result = match example.kind() {
        "FhirEndpoint" => through::<api::FhirEndpoint>(obj),
        "KeyRotationSchedule" => through::<api::KeyRotationSchedule>(obj),
        "RateLimitTier" => through::<api::RateLimitTier>(obj),
        "BackupPolicy" => through::<api::BackupPolicy>(obj),
        other => panic!("{}: unknown kind {other}", example.file_name()),
    };
    result.unwrap_or_else(|e| panic!("{}: does not parse as its type: {e}", example.file_name()))
}

fn changed(example: &str, pointer: &str, value: Value) -> (Value, Value) {
    let old = examples::valid().unwrap().into_iter().find(|e| e.file_name() == example).unwrap().object;
    let mut new = old.clone();
    *new.pointer_mut(pointer).unwrap_or_else(|| panic!("{example} has no {pointer}")) = value;
    (old, new)
}

#[test]
fn immutable_fields_refuse_changes_and_allow_no_op_updates() {
    let cases = [
        ("keyrotationschedule-full.yaml", "/spec/algorithm", json!("hmac-sha256"), "spec.algorithm"),
        ("keyrotationschedule-full.yaml", "/spec/secretName", json!("other-secret"), "spec.secretName"),
        ("fhirendpoint-full.yaml", "/spec/server/fhirVersion", json!("R5"), "spec.server.fhirVersion"),
        ("backuppolicy-full.yaml", "/spec/endpoint", json!("other-endpoint"), "spec.endpoint"),
    ];
    for (example, pointer, value, field) in cases {
        let (old, new) = changed(example, pointer, value);
        let errors = cel_errors(&new, Some(&old));
        assert!(
            errors.iter().any(|(path, msg)| path.starts_with(field) && msg.contains("immutable")),
            "{example}: changing {field} must be refused as immutable, got {errors:?}"
        );
        let on_create = cel_errors(&new, None);
        assert!(
            !on_create.iter().any(|(_, msg)| msg.contains("immutable")),
            "{example}: immutability rules must not fire on create: {on_create:?}"
        );
    }
}

#[test]
fn mutable_fields_can_change() {
    let (old, new) = changed("keyrotationschedule-full.yaml", "/spec/gracePeriod", json!("72h"));
    assert!(cel_errors(&new, Some(&old)).is_empty());
    let (old, new) = changed("fhirendpoint-full.yaml", "/spec/server/replicas", json!(3));
    assert!(cel_errors(&new, Some(&old)).is_empty());
}

#[test]
fn key_schedule_rules_cover_every_algorithm() {
    let krs = |spec: Value| {
        json!({"apiVersion": "fhiroperator.io/v1alpha1", "kind": "KeyRotationSchedule",
            "metadata": {"name": "k"}, "spec": spec})
    };
    for algorithm in ["hmac-sha256", "aes-256", "ecdsa-p256"] {
        let ok = krs(json!({"algorithm": algorithm, "interval": "30d"}));
        assert!(cel_errors(&ok, None).is_empty(), "{algorithm} without clients is valid");
        let bad = krs(json!({"algorithm": algorithm, "interval": "30d", "clients": ["a"]}));
        let errors = cel_errors(&bad, None);
        assert!(errors.iter().any(|(p, _)| p.starts_with("spec.clients")), "{algorithm} with clients: {errors:?}");
    }
    let neither = krs(json!({"algorithm": "aes-256"}));
    let errors = cel_errors(&neither, None);
    assert!(errors.iter().any(|(_, m)| m.contains("exactly one of spec.schedule or spec.interval")), "{errors:?}");
}
