//! `crds/` and the Helm chart's `crds/` must hold exactly what the Rust
//! types generate, and the chart's RBAC rules exactly `rbac.rs`: the
//! checked-in files are what users and the Helm chart install.

use std::path::{Path, PathBuf};

use fhir_operator::{api, chart, rbac};

fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())).join("..")
}

/// `dir` (relative to the repository) holds exactly the generated CRDs.
fn assert_holds_the_crds(dir: &str) {
    let path = repo().join(dir);
    let mut expected_files = Vec::new();
    for (stem, crd) in api::crds() {
        let file = format!("{stem}.yaml");
        let generated = api::crd_yaml(&crd).expect("CRD renders as YAML");
        let on_disk = std::fs::read_to_string(path.join(&file))
            .unwrap_or_else(|e| panic!("{dir}/{file} unreadable ({e}); run `make crds`"));
        assert!(
            on_disk == generated,
            "{dir}/{file} differs from the Rust types; run `make crds` and commit the result"
        );
        expected_files.push(file);
    }
    let mut present: Vec<String> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{dir}/ unreadable ({e}); run `make crds`"))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(present, expected_files, "{dir}/ holds files no type generates; remove them");
}

#[test]
fn crds_directory_matches_the_types() {
    assert_holds_the_crds("crds");
}

/// The chart installs the same CRDs as `crds/` (one source: the types).
#[test]
fn the_charts_crds_match_the_types() {
    assert_holds_the_crds("charts/fhir-operator/crds");
}

/// The chart's RBAC rules are generated from `operator/src/rbac.rs`.
#[test]
fn the_charts_rbac_rules_match_rbac_rs() {
    let file = repo().join("charts/fhir-operator").join(chart::RULES_FILE);
    let on_disk = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{} unreadable ({e}); run `make chart`", file.display()));
    let generated = chart::rules_template(rbac::RULES);
    assert!(
        on_disk == generated,
        "charts/fhir-operator/{} differs from operator/src/rbac.rs; run `make chart` and commit the result",
        chart::RULES_FILE
    );
}

#[test]
fn every_kind_has_its_names_category_and_status() {
    for (stem, crd) in api::crds() {
        let names = &crd.spec.names;
        assert_eq!(names.plural, stem);
        assert_eq!(crd.spec.group, api::GROUP);
        assert_eq!(names.categories.as_deref(), Some(&[api::CATEGORY.to_owned()][..]), "{stem}: category");
        assert!(names.short_names.as_ref().is_some_and(|s| !s.is_empty()), "{stem}: short name");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, api::VERSION);
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{stem}: status subresource");
        let columns = version.additional_printer_columns.as_deref().unwrap_or_default();
        assert_eq!(columns.first().map(|c| c.name.as_str()), Some("Ready"), "{stem}: Ready is the first column");
        assert_eq!(columns.last().map(|c| c.name.as_str()), Some("Age"), "{stem}: Age is the last column");
    }
    let scopes: Vec<_> = api::crds().into_iter().map(|(s, c)| (s, c.spec.scope)).collect();
    assert!(scopes.contains(&("ratelimittiers", "Cluster".to_owned())));
    assert!(scopes.iter().filter(|(_, s)| s == "Namespaced").count() == 3);
}
