//! `crds/` must hold exactly what the Rust types generate: the checked-in
//! YAML is what users and the Helm chart install.

use std::path::Path;

use fhir_operator::api;

#[test]
fn crds_directory_matches_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("crds");
    let mut expected_files = Vec::new();
    for (stem, crd) in api::crds() {
        let file = format!("{stem}.yaml");
        let generated = api::crd_yaml(&crd).expect("CRD renders as YAML");
        let on_disk = std::fs::read_to_string(dir.join(&file))
            .unwrap_or_else(|e| panic!("crds/{file} unreadable ({e}); run `make crds`"));
        assert!(on_disk == generated, "crds/{file} differs from the Rust types; run `make crds` and commit the result");
        expected_files.push(file);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .expect("crds/ exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(present, expected_files, "crds/ holds files no type generates; remove them");
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
