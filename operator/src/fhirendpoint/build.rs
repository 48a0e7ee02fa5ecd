//! Validated endpoint + dereferenced inputs → the children it should have.
//! Pure: no client, no clock, no randomness; the same input gives the same
//! objects, byte for byte (what `fhir-operator render` prints).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::gateway::{self, LimitKey, Limits, Rate};
use super::monitoring::{self, AlertSettings, PrometheusRule, ServiceMonitor};
use super::validate::Validated;
use super::{audit, auth, network, pod};
use crate::api::{RateLimitKey, RateLimitTierSpec};
use crate::discovery::{Capabilities, PdbApi};
use crate::meta::{MANAGED_BY, MANAGED_BY_LABEL, child_meta};
use jsonwebtoken::jwk::JwkSet;

/// Label naming the endpoint on every child.
pub const ENDPOINT_LABEL: &str = "fhiroperator.io/endpoint";
/// Pod template annotations whose change rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "fhiroperator.io/config-hash";
pub const TLS_HASH_ANNOTATION: &str = "fhiroperator.io/tls-hash";
pub const KEYS_HASH_ANNOTATION: &str = "fhiroperator.io/keys-hash";
/// Key of the gateway configuration in its ConfigMap.
pub const NGINX_CONF_KEY: &str = "nginx.conf";

/// Rate limits for endpoints without a tier: generous, but not unlimited.
pub const DEFAULT_LIMITS: Limits = Limits {
    key: LimitKey::Client,
    default: Rate { per_second: 50, burst: 100 },
    read: None,
    write: None,
    max_body_bytes: 1 << 20,
};

/// Container images the operator runs beside the FHIR server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    /// nginx, unprivileged.
    pub gateway: String,
    /// The operator's own image, for the gateway-metrics sidecar.
    pub metrics: String,
}

impl Default for Images {
    fn default() -> Self {
        Self {
            gateway: "nginxinc/nginx-unprivileged:1.27.3-alpine".into(),
            metrics: format!("fhir-operator:{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A KeyRotationSchedule whose keys the gateway accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySource {
    pub schedule: String,
    /// The Secret holding its keys (and the gateway's key map file).
    pub secret_name: String,
    /// Changes whenever the set of accepted key versions changes.
    pub versions_fingerprint: String,
}

/// Everything besides the endpoint that the children depend on, looked up
/// by the reconciler (or by `render` from files).
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The referenced tier's spec, when there is a tier.
    pub tier: Option<RateLimitTierSpec>,
    pub keys: Vec<KeySource>,
    /// The TLS Secret the gateway mounts.
    pub tls_secret: String,
    /// Fingerprint of the certificate in force (public), to roll on renewal.
    pub tls_fingerprint: String,
    pub capabilities: Capabilities,
    pub images: Images,
    /// Each token issuer's public keys, in the order of
    /// `spec.auth.oauth.issuers` (missing or empty: none could be read yet,
    /// and that issuer's tokens are refused).
    pub jwks: Vec<JwkSet>,
    /// The audit trail's public key (PEM), once its Secret exists.
    pub audit_public_key: Option<String>,
    /// Where verifiers report unknown signing keys; `None`: nowhere.
    pub key_hints: Option<auth::KeyHints>,
}

/// The children of one endpoint. `apply` destructures this without `..`,
/// so a new kind that is not applied does not compile.
#[derive(Debug, Clone)]
pub struct Children {
    pub service_account: ServiceAccount,
    pub gateway_config: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub network_policy: NetworkPolicy,
    /// With more than one replica, where the cluster serves PDBs.
    pub disruption_budget: Option<PodDisruptionBudget>,
    /// With monitoring enabled, where the cluster serves the kinds.
    pub service_monitor: Option<ServiceMonitor>,
    pub prometheus_rule: Option<PrometheusRule>,
}

/// Names of an endpoint's children.
pub fn gateway_config_name(endpoint: &str) -> String {
    format!("{endpoint}-gateway")
}

pub fn self_issued_tls_name(endpoint: &str) -> String {
    format!("{endpoint}-tls")
}

/// Labels on every child of `endpoint`.
pub fn labels(endpoint: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(endpoint);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    labels.insert("app.kubernetes.io/part-of".into(), "fhir-operator".into());
    labels
}

/// Labels that select the endpoint's pods.
pub fn selector_labels(endpoint: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "fhir-endpoint".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), endpoint.to_owned()),
        (ENDPOINT_LABEL.to_owned(), endpoint.to_owned()),
    ])
}

/// The gateway's rate and size limits from a tier.
pub fn limits_from_tier(tier: &RateLimitTierSpec) -> Limits {
    let rate = |rps: i32, burst: i32| Rate { per_second: rps.max(1) as u32, burst: burst.max(0) as u32 };
    Limits {
        key: match tier.key {
            RateLimitKey::Client => LimitKey::Client,
            RateLimitKey::SourceIp => LimitKey::SourceIp,
        },
        default: rate(tier.requests_per_second, tier.burst),
        read: tier.read.as_ref().map(|l| rate(l.requests_per_second, l.burst)),
        write: tier.write.as_ref().map(|l| rate(l.requests_per_second, l.burst)),
        max_body_bytes: quantity_bytes(&tier.max_request_body_size).unwrap_or(DEFAULT_LIMITS.max_body_bytes),
    }
}

/// `512Ki`, `10Mi`, `1Gi` or plain bytes → bytes.
pub fn quantity_bytes(text: &str) -> Option<u64> {
    let (digits, factor) = match text {
        t if t.ends_with("Ki") => (&t[..t.len() - 2], 1u64 << 10),
        t if t.ends_with("Mi") => (&t[..t.len() - 2], 1 << 20),
        t if t.ends_with("Gi") => (&t[..t.len() - 2], 1 << 30),
        t => (t, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(factor)
}

/// With an audit trail, nginx appends its access log to the file the audit
/// sidecar follows (on an emptyDir), and sends no syslog copy.
pub fn audited(v: &Validated<'_>, settings: gateway::GatewaySettings) -> gateway::GatewaySettings {
    match &v.audit {
        Some(_) => gateway::GatewaySettings {
            access_log: crate::audit::ACCESS_LOG_FILE.into(),
            access_log_syslog: None,
            ..settings
        },
        None => settings,
    }
}

/// The children `v` should have, given `inputs`.
/// Fails only when the gateway cannot express the limits (see
/// [`gateway::GatewayError`]).
pub fn build(v: &Validated<'_>, owner: OwnerReference, inputs: &Inputs) -> Result<Children, gateway::GatewayError> {
    let spec = &v.endpoint.spec;
    let labels = labels(&v.name);
    let meta = |name: String| child_meta(name, &v.namespace, &labels, owner.clone());

    let limits = inputs.tier.as_ref().map(limits_from_tier).unwrap_or(DEFAULT_LIMITS);
    let nginx_conf = gateway::nginx_conf(&gateway::GatewaySettings {
        public_host: v.public_host.clone(),
        public_port: v.public_port,
        auth: pod::gateway_auth(v),
        ..audited(v, pod::gateway_settings(limits))
    })?;
    // Only nginx.conf rolls the pods: the verifier reads its configuration
    // (scopes, keys) again when the kubelet updates the mounted file.
    let config_hash = crate::meta::sha256_hex(nginx_conf.as_bytes());
    let mut data = BTreeMap::from([(NGINX_CONF_KEY.to_owned(), nginx_conf)]);
    if let Some(auth) = &v.auth {
        let hints = inputs.key_hints.as_ref().map(|h| crate::gateway_auth::KeyHintsConfig {
            url: h.url.to_string(),
            namespace: v.namespace.clone(),
            endpoint: v.name.clone(),
        });
        let config = auth::auth_config(auth, v.flavor.base_path(), &inputs.jwks, hints);
        let json = serde_json::to_string_pretty(&config).unwrap_or_default();
        data.insert(auth::AUTH_CONFIG_KEY.to_owned(), json);
        if let Some(smart) = auth::smart_configuration(&spec.auth) {
            data.insert(auth::SMART_CONFIGURATION_KEY.to_owned(), smart);
        }
    }
    if let (Some(_), Some(public)) = (&v.audit, &inputs.audit_public_key) {
        data.insert(audit::PUBLIC_KEY_CONFIG_KEY.to_owned(), public.clone());
    }
    let gateway_config =
        ConfigMap { metadata: meta(gateway_config_name(&v.name)), data: Some(data), ..Default::default() };

    let service_account = ServiceAccount {
        metadata: meta(v.name.clone()),
        // The pods call no Kubernetes API: no token in them.
        automount_service_account_token: Some(false),
        ..Default::default()
    };

    let deployment = pod::deployment(v, meta(v.name.clone()), inputs, &config_hash);
    let service = network::service(v, meta(v.name.clone()));
    let network_policy = network::network_policy(v, meta(v.name.clone()), inputs.key_hints.as_ref());

    let disruption_budget =
        (spec.server.replicas > 1 && inputs.capabilities.pdb != PdbApi::NotServed).then(|| PodDisruptionBudget {
            metadata: meta(v.name.clone()),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector { match_labels: Some(selector_labels(&v.name)), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        });

    let monitored = spec.monitoring.enabled && inputs.capabilities.monitoring;
    let alerts = AlertSettings {
        latency_p99_seconds: v.latency_p99_seconds,
        error_ratio: spec.monitoring.error_ratio,
        audit: v.audit.as_ref().map(|a| monitoring::AuditAlerts {
            seal_every_seconds: a.seal_every.as_secs(),
            active_hours: a.active_hours,
            distinct_patients: a.distinct_patients_per_hour,
        }),
        ..AlertSettings::new(&v.namespace, &v.name)
    };
    let service_monitor = monitored.then(|| ServiceMonitor {
        metadata: meta(v.name.clone()),
        spec: monitoring::service_monitor_spec(&alerts, selector_labels(&v.name)),
    });
    let prometheus_rule = monitored
        .then(|| PrometheusRule { metadata: meta(v.name.clone()), spec: monitoring::prometheus_rule_spec(&alerts) });

    Ok(Children {
        service_account,
        gateway_config,
        deployment,
        service,
        network_policy,
        disruption_budget,
        service_monitor,
        prometheus_rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_convert_to_bytes() {
        assert_eq!(quantity_bytes("512Ki"), Some(512 * 1024));
        assert_eq!(quantity_bytes("10Mi"), Some(10 * 1024 * 1024));
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_bytes("ten"), None);
        assert_eq!(quantity_bytes("99999999999999Gi"), None, "overflow is refused, not wrapped");
    }
}
