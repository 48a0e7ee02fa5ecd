//! The endpoint's Service and NetworkPolicy. The policy denies everything
//! in and out by default, then allows: clients to the gateway (the own
//! namespace and `spec.access.from`), monitoring scrapes of the metrics
//! port, DNS, and the database port.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::auth::KeyHints;
use super::build::selector_labels;
use super::gateway;
use super::validate::Validated;
use crate::api::AccessPeer;

/// Port clients use on the Service.
pub const SERVICE_HTTPS_PORT: i32 = 443;

/// The in-cluster URL of the endpoint.
pub fn url(name: &str, namespace: &str) -> String {
    format!("https://{name}.{namespace}.svc")
}

pub fn service(v: &Validated<'_>, metadata: ObjectMeta) -> Service {
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&v.name)),
            ports: Some(vec![
                ServicePort {
                    name: Some("https".into()),
                    port: SERVICE_HTTPS_PORT,
                    target_port: Some(IntOrString::String("https".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: gateway::METRICS_PORT.into(),
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort { port: Some(IntOrString::Int(port)), protocol: Some("TCP".into()), ..Default::default() }
}

fn peer(p: &AccessPeer) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: p.namespace_selector.clone(),
        pod_selector: p.pod_selector.clone(),
        ..Default::default()
    }
}

fn labelled(pairs: &[(&str, &str)]) -> LabelSelector {
    let labels: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    LabelSelector { match_labels: Some(labels), ..Default::default() }
}

/// Pods labelled as Prometheus by prometheus-operator, in any namespace.
fn default_scrapers() -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        pod_selector: Some(labelled(&[("app.kubernetes.io/name", "prometheus")])),
        ..Default::default()
    }
}

/// `key_hints`: where the verifier reports unknown signing keys, when some
/// token issuer's keys come from a URL (the operator's port, nothing else).
pub fn network_policy(v: &Validated<'_>, metadata: ObjectMeta, key_hints: Option<&KeyHints>) -> NetworkPolicy {
    let spec = &v.endpoint.spec;
    // Clients: every pod of the endpoint's own namespace, plus the listed peers.
    let mut clients = vec![NetworkPolicyPeer { pod_selector: Some(LabelSelector::default()), ..Default::default() }];
    clients.extend(spec.access.from.iter().map(peer));
    let scrapers = if spec.monitoring.scrape_from.is_empty() {
        vec![default_scrapers()]
    } else {
        spec.monitoring.scrape_from.iter().map(peer).collect()
    };
    let ingress = vec![
        NetworkPolicyIngressRule { from: Some(clients), ports: Some(vec![tcp(gateway::HTTPS_PORT.into())]) },
        NetworkPolicyIngressRule { from: Some(scrapers), ports: Some(vec![tcp(gateway::METRICS_PORT.into())]) },
    ];
    let mut egress = vec![NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            pod_selector: Some(labelled(&[("k8s-app", "kube-dns")])),
            ..Default::default()
        }]),
        ports: Some(vec![
            NetworkPolicyPort { port: Some(IntOrString::Int(53)), protocol: Some("UDP".into()), ..Default::default() },
            tcp(53),
        ]),
    }];
    if let Some(db) = &spec.database {
        // A host name cannot be a NetworkPolicy peer: allow the database
        // port to any address, and nothing else.
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: "0.0.0.0/0".into(), except: None }),
                ..Default::default()
            }]),
            ports: Some(vec![tcp(db.port)]),
        });
    }
    if let Some(port) = v.audit.as_ref().and_then(super::audit::s3_port) {
        // The audit sidecar writes to the S3 endpoint: its port, to any
        // address (a host name cannot be a peer).
        egress.push(NetworkPolicyEgressRule {
            to: Some(vec![NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: "0.0.0.0/0".into(), except: None }),
                ..Default::default()
            }]),
            ports: Some(vec![tcp(port.into())]),
        });
    }
    if let Some(hints) = key_hints.filter(|_| v.auth.as_ref().is_some_and(|a| a.refreshable())) {
        let to = match &hints.operator_pods {
            Some((namespace, labels)) => NetworkPolicyPeer {
                namespace_selector: Some(labelled(&[("kubernetes.io/metadata.name", namespace)])),
                pod_selector: Some(LabelSelector { match_labels: Some(labels.clone()), ..Default::default() }),
                ..Default::default()
            },
            None => NetworkPolicyPeer {
                ip_block: Some(IPBlock { cidr: "0.0.0.0/0".into(), except: None }),
                ..Default::default()
            },
        };
        egress.push(NetworkPolicyEgressRule { to: Some(vec![to]), ports: Some(vec![tcp(hints.port.into())]) });
    }
    NetworkPolicy {
        metadata,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector { match_labels: Some(selector_labels(&v.name)), ..Default::default() }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FhirEndpoint;
    use crate::fhirendpoint::validate::validate;
    use serde_json::json;

    fn endpoint(jwks: serde_json::Value) -> FhirEndpoint {
        serde_json::from_value(json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
            "metadata": {"name": "patients", "namespace": "clinical"},
            "spec": {
                "publicUrl": "https://patients.example.org/fhir",
                "server": {"image": "hapiproject/hapi:v7.2.0"},
                "auth": {"oauth": {"issuers": [{"issuer": "https://idp.example.org",
                    "audiences": ["https://patients.example.org/fhir"], "jwks": jwks}]}},
            }
        }))
        .expect("endpoint")
    }

    fn hint_rules(ep: &FhirEndpoint, hints: &KeyHints) -> Vec<NetworkPolicyEgressRule> {
        let v = validate(ep).expect("valid");
        let policy = network_policy(&v, ObjectMeta::default(), Some(hints));
        let egress = policy.spec.and_then(|s| s.egress).unwrap_or_default();
        egress
            .into_iter()
            .filter(|r| r.ports.as_ref().is_some_and(|p| p[0].port == Some(IntOrString::Int(8081))))
            .collect()
    }

    #[test]
    fn gateways_reach_only_the_operators_hint_port_and_only_with_a_jwks_url() {
        let labels = BTreeMap::from([("app.kubernetes.io/name".to_owned(), "fhir-operator".to_owned())]);
        let hints = KeyHints {
            url: url::Url::parse("http://fhir-operator-key-hints.fhir-system.svc:8081/v1/key-hints").unwrap(),
            port: 8081,
            operator_pods: Some(("fhir-system".into(), labels.clone())),
        };
        let by_url = endpoint(json!({"uri": "https://idp.example.org/jwks"}));
        let rules = hint_rules(&by_url, &hints);
        assert_eq!(rules.len(), 1);
        let to = &rules[0].to.as_ref().expect("peers")[0];
        assert_eq!(to.pod_selector.as_ref().and_then(|s| s.match_labels.clone()), Some(labels));
        assert_eq!(
            to.namespace_selector.as_ref().and_then(|s| s.match_labels.clone()),
            Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), "fhir-system".to_owned())]))
        );
        assert!(to.ip_block.is_none());
        // Keys from a ConfigMap: nothing to hint, no rule.
        let by_config_map = endpoint(json!({"configMap": {"name": "idp-jwks", "key": "jwks.json"}}));
        assert!(hint_rules(&by_config_map, &hints).is_empty());
    }
}
