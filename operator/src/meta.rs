//! Labels, annotations, owner references and content hashes shared by
//! every child the operator creates.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// `app.kubernetes.io/managed-by` on every child; the operator's caches
/// watch only objects carrying it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "fhir-operator";
/// Label selector for everything the operator manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=fhir-operator";
/// Hash of the desired child as last applied, for deciding whether a child
/// needs writing at all.
pub const APPLIED_HASH_ANNOTATION: &str = "fhiroperator.io/applied-hash";

/// Hex SHA-256 of any serializable value (its JSON form; serde_json writes
/// struct fields in declaration order and maps sorted, so it is stable).
pub fn hash_of<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The controller owner reference to `owner`. Owners come from the API
/// server (they have uid and name), so the fallbacks never apply in practice.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    owner.controller_owner_ref(&()).unwrap_or_else(|| OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        // As kube's `controller_owner_ref` for an object from the cluster:
        // `render` (objects from Git have no uid) shows what is applied.
        block_owner_deletion: None,
    })
}

/// Metadata of a child: name, namespace, labels, owner.
pub fn child_meta(
    name: String,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    owner: OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner]),
        ..Default::default()
    }
}
