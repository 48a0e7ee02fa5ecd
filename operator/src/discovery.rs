//! Which optional APIs the cluster serves. The operator adapts instead of
//! failing: no monitoring.coreos.com/v1 means no ServiceMonitor or
//! PrometheusRule (and a condition saying so); PodDisruptionBudgets go to
//! `policy/v1` where served (1.21+), else `policy/v1beta1`.

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Client, Resource};
use serde::{Deserialize, Serialize};

/// Optional APIs, as discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// monitoring.coreos.com/v1 serves servicemonitors and prometheusrules.
    pub monitoring: bool,
    pub pdb: PdbApi,
}

/// Which PodDisruptionBudget API the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PdbApi {
    #[default]
    V1,
    V1beta1,
    NotServed,
}

impl Capabilities {
    /// What `render` assumes: a current cluster with prometheus-operator.
    pub fn full() -> Self {
        Self { monitoring: true, pdb: PdbApi::V1 }
    }
}

/// Asks the API server which optional APIs it serves.
pub async fn discover(client: &Client) -> Result<Capabilities, kube::Error> {
    let monitoring = serves(client, "monitoring.coreos.com/v1", &["servicemonitors", "prometheusrules"]).await?;
    let pdb = if serves(client, "policy/v1", &["poddisruptionbudgets"]).await? {
        PdbApi::V1
    } else if serves(client, "policy/v1beta1", &["poddisruptionbudgets"]).await? {
        PdbApi::V1beta1
    } else {
        PdbApi::NotServed
    };
    Ok(Capabilities { monitoring, pdb })
}

async fn serves(client: &Client, group_version: &str, plurals: &[&str]) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Ok(plurals.iter().all(|p| list.resources.iter().any(|r| r.name == *p))),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// A `policy/v1beta1` PodDisruptionBudget, for clusters before 1.21. Its
/// fields are those of `policy/v1` that the operator sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodDisruptionBudgetV1beta1 {
    /// Defaulted: the items of a list response carry no `apiVersion` or
    /// `kind` (a relist with a PDB in the cluster failed on them).
    #[serde(rename = "apiVersion", default = "v1beta1_api_version")]
    pub api_version: String,
    #[serde(default = "pdb_kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodDisruptionBudgetSpec>,
}

fn v1beta1_api_version() -> String {
    "policy/v1beta1".into()
}

fn pdb_kind() -> String {
    "PodDisruptionBudget".into()
}

impl From<PodDisruptionBudget> for PodDisruptionBudgetV1beta1 {
    fn from(pdb: PodDisruptionBudget) -> Self {
        Self { api_version: v1beta1_api_version(), kind: pdb_kind(), metadata: pdb.metadata, spec: pdb.spec }
    }
}

impl Resource for PodDisruptionBudgetV1beta1 {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "PodDisruptionBudget".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "policy".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1beta1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "poddisruptionbudgets".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1beta1_pdb_list_parses_though_its_items_carry_no_api_version() {
        let list = serde_json::json!({
            "kind": "PodDisruptionBudgetList", "apiVersion": "policy/v1beta1", "metadata": {"resourceVersion": "7"},
            "items": [{"metadata": {"name": "patients", "namespace": "clinical"}, "spec": {"maxUnavailable": 1}}],
        });
        let list: kube::core::ObjectList<PodDisruptionBudgetV1beta1> = serde_json::from_value(list).unwrap();
        assert_eq!(list.items[0].api_version, "policy/v1beta1");
        assert_eq!(list.items[0].kind, "PodDisruptionBudget");
        assert_eq!(list.items[0].metadata.name.as_deref(), Some("patients"));
    }
}
