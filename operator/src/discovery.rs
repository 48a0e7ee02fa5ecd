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
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<PodDisruptionBudgetSpec>,
}

impl From<PodDisruptionBudget> for PodDisruptionBudgetV1beta1 {
    fn from(pdb: PodDisruptionBudget) -> Self {
        Self {
            api_version: "policy/v1beta1".into(),
            kind: "PodDisruptionBudget".into(),
            metadata: pdb.metadata,
            spec: pdb.spec,
        }
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
