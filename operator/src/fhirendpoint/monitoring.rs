//! Monitoring children of a FhirEndpoint: a ServiceMonitor that scrapes
//! the gateway-metrics sidecar, and a PrometheusRule with the endpoint's
//! alerts (monitoring.coreos.com/v1, created only when the cluster serves
//! those kinds). Typed structs for the fields this operator sets.
//!
//! The operator never installs these CRDs (prometheus-operator owns them);
//! `ServiceMonitor::crd()` and `PrometheusRule::crd()` exist so tests can
//! play "this cluster runs prometheus-operator". Every object of the schema
//! keeps unknown fields, so full upstream objects are accepted and kept.
//!
//! The builders are pure: the same settings always give the same bytes.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::gateway_metrics::{
    CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, REJECTIONS_TOTAL, REQUEST_DURATION_SECONDS, REQUESTS_TOTAL, RejectionReason,
    StatusClass,
};

/// Name of the Service port that exposes the gateway-metrics sidecar
/// (`gateway::METRICS_PORT`). Prometheus gives its targets `endpoint="metrics"`.
pub const METRICS_PORT_NAME: &str = "metrics";
/// How often Prometheus scrapes the sidecar. The alerts' 5 minute windows
/// hold ten scrapes.
pub const SCRAPE_INTERVAL: &str = "30s";

/// Default of [`AlertSettings::latency_p99_seconds`] (the API's `500ms`).
pub const DEFAULT_LATENCY_P99_SECONDS: f64 = 0.5;
/// Default of [`AlertSettings::error_ratio`] (the API's `0.01`).
pub const DEFAULT_ERROR_RATIO: f64 = 0.01;
/// Default of [`AlertSettings::certificate_days_warning`].
pub const DEFAULT_CERTIFICATE_DAYS_WARNING: u32 = 14;
/// Default of [`AlertSettings::rate_limited_per_second`].
pub const DEFAULT_RATE_LIMITED_PER_SECOND: f64 = 1.0;
/// Default of [`AlertSettings::unauthorized_per_second`].
pub const DEFAULT_UNAUTHORIZED_PER_SECOND: f64 = 1.0;

/// SLO thresholds and names that the alerts are rendered from.
///
/// Thresholds must be finite numbers (validation's job): PromQL compares
/// nothing with NaN, so a NaN threshold would silence its alert.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    pub namespace: String,
    /// The endpoint's name (also its Service's name).
    pub endpoint: String,
    /// p99 latency threshold in seconds.
    pub latency_p99_seconds: f64,
    /// Share of 5xx responses that alerts, 0 to 1.
    pub error_ratio: f64,
    /// Warn when the gateway's certificate expires within this many days.
    pub certificate_days_warning: u32,
    /// Warn when one client is refused with 429 more often than this
    /// (requests per second, averaged over 5 minutes, for 5 minutes).
    pub rate_limited_per_second: f64,
    /// Warn when the endpoint refuses requests with 401 more often than this
    /// (requests per second, averaged over 5 minutes, for 5 minutes).
    pub unauthorized_per_second: f64,
    /// With an audit trail: what its sidecar exports is watched too.
    pub audit: Option<AuditAlerts>,
}

/// Alerts on what the audit sidecar counts.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditAlerts {
    /// Seconds between seals: a trail without a seal for twice this alerts.
    pub seal_every_seconds: u64,
    /// UTC hours `[start, end)` when requests are expected; others alert.
    pub active_hours: Option<(u8, u8)>,
    /// Distinct patients one client may touch within the sidecar's window
    /// (an hour) before it alerts.
    pub distinct_patients: u32,
}

/// Default of [`AuditAlerts::distinct_patients`].
pub const DEFAULT_DISTINCT_PATIENTS: u32 = 500;
/// A client's request rate over 5 minutes alerts above this many times its
/// own rate of the hour before (and above 1 request per second).
pub const RATE_ANOMALY_FACTOR: f64 = 5.0;
/// 401 and 403 answers per minute that make a burst.
pub const AUTH_FAILURE_BURST_PER_MINUTE: u32 = 60;
/// Scope denials of one client within 10 minutes that alert.
pub const SCOPE_DENIALS_PER_10M: u32 = 10;

impl AlertSettings {
    /// Settings with every threshold at its default.
    pub fn new(namespace: impl Into<String>, endpoint: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            endpoint: endpoint.into(),
            latency_p99_seconds: DEFAULT_LATENCY_P99_SECONDS,
            error_ratio: DEFAULT_ERROR_RATIO,
            certificate_days_warning: DEFAULT_CERTIFICATE_DAYS_WARNING,
            rate_limited_per_second: DEFAULT_RATE_LIMITED_PER_SECOND,
            unauthorized_per_second: DEFAULT_UNAUTHORIZED_PER_SECOND,
            audit: None,
        }
    }
}

/// How Prometheus finds the sidecar: the endpoint's Service, port `metrics`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "ServiceMonitor", namespaced)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct ServiceMonitorSpec {
    /// Services to scrape, by label.
    pub selector: LabelSelector,
    #[serde(default)]
    pub endpoints: Vec<ServiceMonitorEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<NamespaceSelector>,
}

/// One scraped port of the selected Services.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct ServiceMonitorEndpoint {
    /// Name of the Service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Namespaces whose Services the selector applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSelector {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_names: Vec<String>,
}

/// Alerting rules for Prometheus. Serialized alone, the spec is the
/// `groups:` document of a Prometheus rule file (see [`rule_groups_yaml`]).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(group = "monitoring.coreos.com", version = "v1", kind = "PrometheusRule", namespaced)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct PrometheusRuleSpec {
    #[serde(default)]
    pub groups: Vec<RuleGroup>,
}

/// Rules evaluated together.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct RuleGroup {
    pub name: String,
    /// Evaluation interval; absent: Prometheus's global one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// One alerting rule. (Upstream also has recording rules, with `record`
/// instead of `alert`; this operator writes none.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct Rule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alert: String,
    /// PromQL; the alert fires for every series it returns.
    pub expr: String,
    /// How long `expr` must hold before the alert fires.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub for_: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The ServiceMonitor of one endpoint: Services matching `selector` (the
/// endpoint's own labels) in its namespace, port [`METRICS_PORT_NAME`],
/// plain HTTP (the sidecar holds no secrets; the NetworkPolicy decides who
/// may scrape).
pub fn service_monitor_spec(settings: &AlertSettings, selector: BTreeMap<String, String>) -> ServiceMonitorSpec {
    ServiceMonitorSpec {
        selector: LabelSelector { match_labels: Some(selector), match_expressions: None },
        endpoints: vec![ServiceMonitorEndpoint {
            port: Some(METRICS_PORT_NAME.to_owned()),
            scheme: Some("http".to_owned()),
            interval: Some(SCRAPE_INTERVAL.to_owned()),
            path: Some("/metrics".to_owned()),
        }],
        namespace_selector: Some(NamespaceSelector { any: false, match_names: vec![settings.namespace.clone()] }),
    }
}

/// The endpoint's alerts, one group. Every expression selects the
/// endpoint's series by the `namespace` and `service` target labels that
/// Prometheus adds from the ServiceMonitor, so its alerts carry both.
pub fn prometheus_rule_spec(settings: &AlertSettings) -> PrometheusRuleSpec {
    let who = format!("FhirEndpoint {}/{}", settings.namespace, settings.endpoint);
    let up = format!("up{}", matchers(settings, &[("endpoint", METRICS_PORT_NAME)]));
    let requests = |extra: &[(&str, &str)]| format!("{REQUESTS_TOTAL}{}", matchers(settings, extra));
    let rejections =
        |reason: RejectionReason| format!("{REJECTIONS_TOTAL}{}", matchers(settings, &[("reason", reason.as_str())]));
    let latency = number(settings.latency_p99_seconds);
    let days = settings.certificate_days_warning;
    let rules = vec![
        alert(
            "FhirEndpointDown",
            format!("max by (namespace, service, endpoint) ({up}) == 0 or absent({up})"),
            "5m",
            "critical",
            format!("{who} is down"),
            format!(
                "No gateway-metrics sidecar of {who} has answered a Prometheus scrape for 5 minutes \
                 (up is 0, or no target is left): check its pods and their readiness."
            ),
        ),
        alert(
            "FhirEndpointHighErrorRatio",
            format!(
                "sum by (namespace, service) (rate({}[5m])) / sum by (namespace, service) (rate({}[5m])) > {}",
                requests(&[("status_class", StatusClass::ServerError.as_str())]),
                requests(&[]),
                number(settings.error_ratio)
            ),
            "10m",
            "critical",
            format!("{who} answers too many requests with 5xx"),
            format!(
                "{{{{ $value | humanizePercentage }}}} of the requests to {who} failed with 5xx over 5 minutes, \
                 above the {}% SLO, for 10 minutes.",
                percent(settings.error_ratio)
            ),
        ),
        alert(
            "FhirEndpointHighLatencyP99",
            format!(
                "histogram_quantile(0.99, sum by (namespace, service, le) (rate({REQUEST_DURATION_SECONDS}_bucket{}[5m]))) > {latency}",
                matchers(settings, &[])
            ),
            "10m",
            "warning",
            format!("{who} is slow"),
            format!(
                "The 99th percentile request time of {who} is {{{{ $value | humanizeDuration }}}}, \
                 above the {latency}s SLO, for 10 minutes."
            ),
        ),
        alert(
            "FhirEndpointRateLimitSpike",
            format!(
                "sum by (namespace, service, client) (rate({}[5m])) > {}",
                rejections(RejectionReason::RateLimited),
                number(settings.rate_limited_per_second)
            ),
            "5m",
            "warning",
            format!("A client of {who} is being rate limited"),
            format!(
                "Client \"{{{{ $labels.client }}}}\" of {who} gets {{{{ $value | humanize }}}} responses 429 per second \
                 (warning above {}/s): its RateLimitTier may be too small, or the client misbehaves.",
                number(settings.rate_limited_per_second)
            ),
        ),
        alert(
            "FhirEndpointUnauthorizedSpike",
            format!(
                "sum by (namespace, service) (rate({}[5m])) > {}",
                rejections(RejectionReason::Unauthorized),
                number(settings.unauthorized_per_second)
            ),
            "5m",
            "warning",
            format!("{who} refuses many requests without a valid API key"),
            format!(
                "{who} answers {{{{ $value | humanize }}}} requests per second with 401 (warning above {}/s): \
                 a client may still use a retired key, or someone is guessing keys.",
                number(settings.unauthorized_per_second)
            ),
        ),
        alert(
            "FhirEndpointCertificateExpiringSoon",
            format!(
                "min by (namespace, service) ({CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS}{}) - time() < {days} * 86400",
                matchers(settings, &[])
            ),
            "15m",
            "warning",
            format!("The TLS certificate of {who} expires soon"),
            format!(
                "The TLS certificate of {who} expires in {{{{ $value | humanizeDuration }}}} (warning at {days} days). \
                 Zero or negative: it has expired, or the gateway-metrics sidecar cannot read it."
            ),
        ),
    ];
    let mut rules = rules;
    rules.extend(anomaly_alerts(settings, &who));
    rules.extend(backup_alerts(settings, &who));
    PrometheusRuleSpec {
        groups: vec![RuleGroup {
            name: format!("fhir-endpoint.{}.{}", settings.namespace, settings.endpoint),
            interval: None,
            rules,
        }],
    }
}

/// Unusual access, from the gateway's counters and the audit sidecar's
/// (none labelled with a source address or a patient id).
fn anomaly_alerts(settings: &AlertSettings, who: &str) -> Vec<Rule> {
    let requests = format!("{REQUESTS_TOTAL}{}", matchers(settings, &[]));
    let denied = |reasons: &str| {
        let m = matchers(settings, &[]);
        // matchers() ends with '}': add the reason matcher inside it.
        format!("{REJECTIONS_TOTAL}{},reason=~\"{reasons}\"}}", &m[..m.len() - 1])
    };
    let mut rules = vec![
        alert(
            "FhirEndpointClientRateAnomaly",
            format!(
                "sum by (namespace, service, client) (rate({requests}[5m])) > {factor} * \
                 sum by (namespace, service, client) (rate({requests}[1h] offset 5m)) \
                 and sum by (namespace, service, client) (rate({requests}[5m])) > 1",
                factor = number(RATE_ANOMALY_FACTOR)
            ),
            "10m",
            "warning",
            format!("A client of {who} sends far more requests than it usually does"),
            format!(
                "Client \"{{{{ $labels.client }}}}\" of {who} sends {{{{ $value | humanize }}}} requests per second, \
                 over {} times its rate of the hour before: a runaway job, or its credentials in other hands.",
                number(RATE_ANOMALY_FACTOR)
            ),
        ),
        alert(
            "FhirEndpointAuthFailureBurst",
            format!(
                "sum by (namespace, service) (increase({}[1m])) > {AUTH_FAILURE_BURST_PER_MINUTE}",
                denied("unauthorized|forbidden")
            ),
            "2m",
            "warning",
            format!("{who} refuses a burst of requests (401/403)"),
            format!(
                "{who} answered {{{{ $value | humanize }}}} requests with 401 or 403 within a minute \
                 (alert above {AUTH_FAILURE_BURST_PER_MINUTE}): credentials being guessed, or a client with retired ones. \
                 The audit trail names the clients and sources."
            ),
        ),
        alert(
            "FhirEndpointScopeDenials",
            format!(
                "sum by (namespace, service, client) (increase({}[10m])) > {SCOPE_DENIALS_PER_10M}",
                denied("forbidden")
            ),
            "0m",
            "warning",
            format!("A client of {who} asks for what its scopes do not allow"),
            format!(
                "Client \"{{{{ $labels.client }}}}\" of {who} was refused {{{{ $value | humanize }}}} times in 10 minutes \
                 for want of scope (alert above {SCOPE_DENIALS_PER_10M}): a misconfigured client, or one probing."
            ),
        ),
    ];
    let Some(audit) = &settings.audit else { return rules };
    let seal = format!("{}{}", crate::audit::metrics::LAST_SEAL_TIMESTAMP_SECONDS, matchers(settings, &[]));
    rules.push(alert(
        "FhirEndpointAuditSealStale",
        format!("time() - max by (namespace, service) ({seal}) > {}", 2 * audit.seal_every_seconds),
        "5m",
        "critical",
        format!("The audit trail of {who} is not being sealed"),
        format!(
            "No audit checkpoint of {who} for {{{{ $value | humanizeDuration }}}} (sealEvery is {}s): \
             records are not reaching the destination. Check the audit-sidecar containers.",
            audit.seal_every_seconds
        ),
    ));
    rules.push(alert(
        "FhirEndpointClientTouchesManyPatients",
        format!(
            "max by (namespace, service, client) ({}{}) > {}",
            crate::audit::metrics::CLIENT_DISTINCT_PATIENTS,
            matchers(settings, &[]),
            audit.distinct_patients
        ),
        "0m",
        "warning",
        format!("A client of {who} reads the records of unusually many patients"),
        format!(
            "Client \"{{{{ $labels.client }}}}\" of {who} touched {{{{ $value | humanize }}}} distinct patients within the \
             audit sidecar's window (alert above {}). `fhir-operator audit query --client` lists them.",
            audit.distinct_patients
        ),
    ));
    if let Some((start, end)) = audit.active_hours {
        rules.push(alert(
            "FhirEndpointRequestsOutsideActiveHours",
            format!(
                "sum by (namespace, service, client) (rate({requests}[5m])) > 0 \
                 and on() (hour() < {start} or hour() >= {end})"
            ),
            "5m",
            "warning",
            format!("A client of {who} is active outside its hours"),
            format!(
                "Client \"{{{{ $labels.client }}}}\" of {who} sends requests outside {start:02}:00-{end:02}:00 UTC, \
                 the hours set in spec.audit.activeHours."
            ),
        ));
    }
    rules
}

/// The operator's gauges of the endpoint's backup policies: the time of the
/// last success and how old it may get (`backup/controller.rs`).
pub const BACKUP_LAST_SUCCESS: &str = "fhir_operator_backup_last_success_timestamp_seconds";
pub const BACKUP_MAX_AGE: &str = "fhir_operator_backup_max_age_seconds";
pub const RESTORE_LAST_VERIFIED: &str = "fhir_operator_restore_last_verified_timestamp_seconds";
pub const RESTORE_MAX_AGE: &str = "fhir_operator_restore_max_age_seconds";

/// Stale backups and restore drills, from the operator's own metrics
/// (labelled `policy_namespace`, `policy`, `fhir_endpoint`).
fn backup_alerts(settings: &AlertSettings, who: &str) -> Vec<Rule> {
    let select = format!(
        "{{policy_namespace=\"{}\",fhir_endpoint=\"{}\"}}",
        promql_string(&settings.namespace),
        promql_string(&settings.endpoint)
    );
    let by = "max by (policy_namespace, policy, fhir_endpoint)";
    vec![
        alert(
            "FhirEndpointBackupStale",
            format!("time() - {by} ({BACKUP_LAST_SUCCESS}{select}) > {by} ({BACKUP_MAX_AGE}{select})"),
            "10m",
            "critical",
            format!("The backups of {who} are stale"),
            format!(
                "The last successful backup of {who} by BackupPolicy {{{{ $labels.policy }}}} is older than twice \
                 its schedule's interval: check the policy's status (lastFailedBackup) and its Jobs."
            ),
        ),
        alert(
            "FhirEndpointRestoreDrillStale",
            format!("time() - {by} ({RESTORE_LAST_VERIFIED}{select}) > {by} ({RESTORE_MAX_AGE}{select})"),
            "10m",
            "warning",
            format!("No recent verified restore of {who}"),
            format!(
                "No restore drill of BackupPolicy {{{{ $labels.policy }}}} has verified a backup of {who} within \
                 the drill's interval: check the policy's status (lastFailedRestore)."
            ),
        ),
    ]
}

/// The spec as the `groups:` document of a Prometheus rule file, what
/// `promtool check rules` and `promtool test rules` read.
pub fn rule_groups_yaml(spec: &PrometheusRuleSpec) -> String {
    // Strings, maps and sequences only: serializing cannot fail.
    serde_yaml::to_string(spec).expect("a PrometheusRuleSpec serializes as YAML")
}

fn alert(name: &str, expr: String, for_: &str, severity: &str, summary: String, description: String) -> Rule {
    Rule {
        alert: name.to_owned(),
        expr,
        for_: Some(for_.to_owned()),
        labels: BTreeMap::from([("severity".to_owned(), severity.to_owned())]),
        annotations: BTreeMap::from([("summary".to_owned(), summary), ("description".to_owned(), description)]),
    }
}

/// `{namespace="…",service="…",extra…}`: the endpoint's series.
fn matchers(settings: &AlertSettings, extra: &[(&str, &str)]) -> String {
    let scope = [("namespace", settings.namespace.as_str()), ("service", settings.endpoint.as_str())];
    let pairs: Vec<String> =
        scope.iter().chain(extra).map(|(name, value)| format!("{name}=\"{}\"", promql_string(value))).collect();
    format!("{{{}}}", pairs.join(","))
}

/// Escapes a PromQL double-quoted string (names are DNS labels, so this
/// only matters for input that validation should already have refused).
fn promql_string(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Shortest decimal that reads back as the same number: stable, and never
/// in exponent form.
fn number(value: f64) -> String {
    format!("{value}")
}

/// A ratio as a percentage for prose, without float noise (0.07 → `7`).
fn percent(ratio: f64) -> String {
    let text = format!("{:.6}", ratio * 100.0);
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_plain_and_stable() {
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(1e-7), "0.0000001");
        assert_eq!(percent(0.07), "7");
        assert_eq!(percent(0.001), "0.1");
        assert_eq!(percent(0.125), "12.5");
    }

    #[test]
    fn matchers_scope_to_the_endpoint_and_escape() {
        let settings = AlertSettings::new("team-a", "fhir\"x");
        assert_eq!(matchers(&settings, &[("reason", "r")]), r#"{namespace="team-a",service="fhir\"x",reason="r"}"#);
    }

    #[test]
    fn the_rule_spec_is_deterministic_and_round_trips() {
        let settings = AlertSettings::new("ns", "ep");
        let spec = prometheus_rule_spec(&settings);
        assert_eq!(spec, prometheus_rule_spec(&settings));
        let yaml = rule_groups_yaml(&spec);
        let back: PrometheusRuleSpec = serde_yaml::from_str(&yaml).expect("reads back");
        assert_eq!(back, spec);
        assert!(yaml.starts_with("groups:\n"), "{yaml}");
    }

    #[test]
    fn crds_are_those_of_prometheus_operator_and_keep_unknown_fields() {
        use kube::CustomResourceExt;
        for (crd, plural, kind) in [
            (ServiceMonitor::crd(), "servicemonitors", "ServiceMonitor"),
            (PrometheusRule::crd(), "prometheusrules", "PrometheusRule"),
        ] {
            assert_eq!(crd.metadata.name.as_deref(), Some(format!("{plural}.monitoring.coreos.com").as_str()));
            assert_eq!((crd.spec.names.kind.as_str(), crd.spec.scope.as_str()), (kind, "Namespaced"));
            let json = serde_json::to_value(&crd).expect("CRD as JSON");
            let schema = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
            let nested = match kind {
                "ServiceMonitor" => &schema["properties"]["endpoints"]["items"],
                _ => &schema["properties"]["groups"]["items"]["properties"]["rules"]["items"],
            };
            for node in [schema, nested] {
                assert_eq!(node["x-kubernetes-preserve-unknown-fields"], true, "{kind}: {node}");
            }
        }
    }

    #[test]
    fn full_upstream_objects_deserialize() {
        let monitor: ServiceMonitor = serde_yaml::from_str(
            "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: app, namespace: ns}\n\
             spec:\n  jobLabel: app\n  selector: {matchLabels: {app: web}}\n  namespaceSelector: {any: true}\n  \
             endpoints:\n  - port: web\n    relabelings: [{sourceLabels: [a], targetLabel: b}]\n  - targetPort: 8080\n",
        )
        .expect("an upstream ServiceMonitor");
        assert_eq!(monitor.spec.endpoints.len(), 2);
        assert_eq!(monitor.spec.namespace_selector.map(|n| n.any), Some(true));
        let rule: PrometheusRule = serde_yaml::from_str(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: r}\n\
             spec:\n  groups:\n  - name: g\n    partial_response_strategy: warn\n    rules:\n    \
             - record: job:up:sum\n      expr: sum by (job) (up)\n",
        )
        .expect("an upstream PrometheusRule with a recording rule");
        assert_eq!(rule.spec.groups[0].rules[0].alert, "");
    }
}
