//! The generated alerts, judged by the real promtool (Debian package
//! `prometheus`, /usr/bin/promtool): `promtool check rules` on the rendered
//! groups, and `promtool test rules` alert unit tests whose input series, in
//! promtool's expanding notation, are shaped like the sidecar's metrics
//! (same names, labels and histogram buckets) with the target labels that
//! Prometheus adds from the ServiceMonitor.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use fhir_operator::fhirendpoint::monitoring::{
    AlertSettings, AuditAlerts, BACKUP_LAST_SUCCESS, BACKUP_MAX_AGE, PrometheusRuleSpec, RESTORE_LAST_VERIFIED,
    RESTORE_MAX_AGE, ServiceMonitor, prometheus_rule_spec, rule_groups_yaml, service_monitor_spec,
};
use fhir_operator::gateway_metrics::{
    CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, DURATION_BUCKETS, REJECTIONS_TOTAL, REQUEST_DURATION_SECONDS, REQUESTS_TOTAL,
};
use serde_json::{Value, json};

const NS: &str = "clinic";
const EP: &str = "fhir";

/// Runs promtool in `dir` and returns its output; fails the test, naming
/// the output, unless promtool succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("promtool").args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!(
            "cannot run promtool ({e}): install the Debian package `prometheus` \
             (`apt-get install prometheus`), which ships /usr/bin/promtool"
        )
    });
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

fn write_rules(dir: &Path, settings: &AlertSettings) -> PrometheusRuleSpec {
    let spec = prometheus_rule_spec(settings);
    std::fs::write(dir.join("rules.yaml"), rule_groups_yaml(&spec)).expect("write rules.yaml");
    spec
}

/// `promtool test rules` on the rules of `settings` with these test groups.
fn promtool_test(settings: &AlertSettings, tests: Vec<Value>) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_rules(dir.path(), settings);
    let file = json!({ "rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests });
    let yaml = serde_yaml::to_string(&file).expect("test file as YAML");
    std::fs::write(dir.path().join("test.yaml"), &yaml).expect("write test.yaml");
    let output = promtool(dir.path(), &["test", "rules", "test.yaml"]);
    assert!(output.contains("SUCCESS"), "{output}\n{yaml}");
}

/// One promtool test group: series sampled every minute, and the alerts
/// expected at given times.
fn scenario(input_series: Vec<Value>, alert_rule_test: Vec<Value>) -> Value {
    json!({ "interval": "1m", "input_series": input_series, "alert_rule_test": alert_rule_test })
}

/// Labels Prometheus gives a scrape of `service` in `namespace`.
fn target(namespace: &str, service: &str, pod: &str) -> Vec<(String, String)> {
    [
        ("namespace", namespace),
        ("service", service),
        ("pod", pod),
        ("endpoint", "metrics"),
        ("job", service),
        ("container", "gateway-metrics"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn series(name: &str, labels: &[(String, String)], extra: &[(&str, &str)], values: &str) -> Value {
    let pairs: Vec<String> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect();
    json!({ "series": format!("{name}{{{}}}", pairs.join(",")), "values": values })
}

/// Expected alerts `alertname` has at `eval_time`.
fn expect(eval_time: &str, alertname: &str, alerts: Vec<Value>) -> Value {
    json!({ "eval_time": eval_time, "alertname": alertname, "exp_alerts": alerts })
}

/// One firing alert of `alertname` in the spec: its labels (the rule's,
/// plus those the expression keeps) and its annotations as Prometheus
/// renders them, each template in `rendered` replaced by the given text.
fn firing(spec: &PrometheusRuleSpec, alertname: &str, labels: &[(&str, &str)], rendered: &[(&str, &str)]) -> Value {
    let rule = spec.groups[0].rules.iter().find(|r| r.alert == alertname).expect("alert in the spec");
    let mut exp_labels = rule.labels.clone();
    exp_labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let exp_annotations: BTreeMap<&String, String> = rule
        .annotations
        .iter()
        .map(|(k, text)| (k, rendered.iter().fold(text.clone(), |t, (template, value)| t.replace(template, value))))
        .collect();
    json!({ "exp_labels": exp_labels, "exp_annotations": exp_annotations })
}

/// Histogram buckets of requests at `fast` seconds (`fast_per_minute`)
/// and at `slow` seconds (`slow_per_minute`), over 30 minutes.
fn latency_series(labels: &[(String, String)], fast_per_minute: u32, slow_per_minute: u32) -> Vec<Value> {
    let (fast, slow) = (0.05, 2.0);
    let bounds = DURATION_BUCKETS.iter().map(|b| (*b, b.to_string())).chain([(f64::INFINITY, "+Inf".to_owned())]);
    bounds
        .map(|(bound, le)| {
            let per_minute = u32::from(fast <= bound) * fast_per_minute + u32::from(slow <= bound) * slow_per_minute;
            let name = format!("{REQUEST_DURATION_SECONDS}_bucket");
            series(&name, labels, &[("method_class", "read"), ("le", &le)], &format!("0+{per_minute}x30"))
        })
        .collect()
}

#[test]
fn promtool_check_rules_accepts_every_rendered_group() {
    let mut strict = AlertSettings::new("team-a", "fhir-prod");
    strict.latency_p99_seconds = 0.075;
    strict.error_ratio = 0.001;
    strict.certificate_days_warning = 30;
    strict.rate_limited_per_second = 0.2;
    strict.unauthorized_per_second = 0.05;
    let mut loose = AlertSettings::new("x", "y");
    loose.latency_p99_seconds = 30.0;
    loose.error_ratio = 1.0;
    loose.certificate_days_warning = 0;
    loose.rate_limited_per_second = 1000.0;
    for settings in [AlertSettings::new(NS, EP), strict, loose] {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = write_rules(dir.path(), &settings);
        let output = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
        let expected = format!("SUCCESS: {} rules found", spec.groups[0].rules.len());
        assert!(output.contains(&expected), "{settings:?}:\n{output}");
    }
}

#[test]
fn latency_alert_fires_when_p99_is_above_the_slo_and_not_below() {
    let labels = target(NS, EP, "fhir-5d8c-a");
    let name = "FhirEndpointHighLatencyP99";
    // 2% of the requests take 2 s: p99 is 1.745 s (linear within the
    // (1.5, 2] bucket), though the median is 50 ms.
    let slow_tail = latency_series(&labels, 1000, 20);
    // 0.5% take 2 s: p99 stays in the 50 ms bucket.
    let fast = latency_series(&labels, 1000, 5);
    let slo = |seconds| AlertSettings { latency_p99_seconds: seconds, ..AlertSettings::new(NS, EP) };

    let settings = slo(0.5);
    let spec = prometheus_rule_spec(&settings);
    let fires =
        firing(&spec, name, &[("namespace", NS), ("service", EP)], &[("{{ $value | humanizeDuration }}", "1.745s")]);
    promtool_test(
        &settings,
        vec![
            scenario(slow_tail.clone(), vec![expect("5m", name, vec![]), expect("15m", name, vec![fires])]),
            scenario(fast, vec![expect("15m", name, vec![]), expect("30m", name, vec![])]),
        ],
    );
    // The threshold is the setting's: the same tail is within a 2 s SLO.
    promtool_test(&slo(2.0), vec![scenario(slow_tail, vec![expect("15m", name, vec![]), expect("30m", name, vec![])])]);
}

#[test]
fn error_ratio_alert_fires_above_the_slo_and_only_for_its_endpoint() {
    let name = "FhirEndpointHighErrorRatio";
    let traffic = |namespace: &str, service: &str, ok_per_minute: u32, failed_per_minute: u32| {
        let labels = target(namespace, service, &format!("{service}-pod"));
        let class = |status_class| [("client", "billing"), ("method_class", "write"), ("status_class", status_class)];
        vec![
            series(REQUESTS_TOTAL, &labels, &class("2xx"), &format!("0+{ok_per_minute}x30")),
            series(REQUESTS_TOTAL, &labels, &class("5xx"), &format!("0+{failed_per_minute}x30")),
        ]
    };
    // Half of the requests fail on two other endpoints: one of the same
    // name in another namespace, one in the same namespace.
    let neighbours = [traffic("elsewhere", EP, 50, 50), traffic(NS, "fhir-test", 50, 50)].concat();
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let fires =
        firing(&spec, name, &[("namespace", NS), ("service", EP)], &[("{{ $value | humanizePercentage }}", "2%")]);
    promtool_test(
        &settings,
        vec![
            // 2% of 5xx, above the 1% SLO: pending, then firing after 10 minutes.
            scenario(
                [traffic(NS, EP, 980, 20), neighbours.clone()].concat(),
                vec![expect("8m", name, vec![]), expect("20m", name, vec![fires])],
            ),
            // 0.5%: quiet, whatever the neighbours do.
            scenario(
                [traffic(NS, EP, 995, 5), neighbours].concat(),
                vec![expect("20m", name, vec![]), expect("30m", name, vec![])],
            ),
        ],
    );
}

#[test]
fn down_alert_fires_when_no_target_is_up_or_none_is_left() {
    let name = "FhirEndpointDown";
    let up = |pod: &str, values: &str| series("up", &target(NS, EP, pod), &[], values);
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let fires = || firing(&spec, name, &[("namespace", NS), ("service", EP), ("endpoint", "metrics")], &[]);
    promtool_test(
        &settings,
        vec![
            // The only pod's sidecar does not answer.
            scenario(vec![up("a", "0x20")], vec![expect("3m", name, vec![]), expect("10m", name, vec![fires()])]),
            // One of two pods is down: degraded, not down.
            scenario(vec![up("a", "0x20"), up("b", "1x20")], vec![expect("10m", name, vec![])]),
            // Healthy.
            scenario(vec![up("a", "1x20")], vec![expect("10m", name, vec![])]),
            // No target left (the ServiceMonitor finds no ready pod), while
            // another endpoint of the namespace is scraped.
            scenario(
                vec![series("up", &target(NS, "fhir-test", "t"), &[], "1x20")],
                vec![expect("10m", name, vec![fires()])],
            ),
        ],
    );
}

#[test]
fn rate_limit_spike_fires_per_client() {
    let name = "FhirEndpointRateLimitSpike";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let limited =
        |client, values| series(REJECTIONS_TOTAL, &labels, &[("client", client), ("reason", "rate_limited")], values);
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let billing = firing(
        &spec,
        name,
        &[("namespace", NS), ("service", EP), ("client", "billing")],
        &[("{{ $labels.client }}", "billing"), ("{{ $value | humanize }}", "3")],
    );
    // billing gets 3 responses 429 per second, lab 0.5 (below 1/s), and
    // 2/s of 401 are another alert's business.
    let input = vec![
        limited("billing", "0+180x20"),
        limited("lab", "0+30x20"),
        series(REJECTIONS_TOTAL, &labels, &[("client", ""), ("reason", "unauthorized")], "0+120x20"),
    ];
    promtool_test(
        &settings,
        vec![scenario(input, vec![expect("3m", name, vec![]), expect("10m", name, vec![billing])])],
    );
}

#[test]
fn unauthorized_spike_fires_above_its_threshold() {
    let name = "FhirEndpointUnauthorizedSpike";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let unauthorized =
        |values| series(REJECTIONS_TOTAL, &labels, &[("client", ""), ("reason", "unauthorized")], values);
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let fires = firing(&spec, name, &[("namespace", NS), ("service", EP)], &[("{{ $value | humanize }}", "2")]);
    promtool_test(
        &settings,
        vec![
            scenario(vec![unauthorized("0+120x20")], vec![expect("10m", name, vec![fires])]),
            scenario(vec![unauthorized("0+30x20")], vec![expect("10m", name, vec![])]),
        ],
    );
}

#[test]
fn certificate_alert_fires_within_the_warning_days() {
    let name = "FhirEndpointCertificateExpiringSoon";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let day = 86_400;
    // promtool's clock starts at 0: at 30m, time() is 1800.
    let expires_in =
        |days: u32| series(CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS, &labels, &[], &format!("{}x40", 1800 + days * day));
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let fires = firing(
        &spec,
        name,
        &[("namespace", NS), ("service", EP)],
        &[("{{ $value | humanizeDuration }}", "10d 0h 0m 0s")],
    );
    promtool_test(
        &settings,
        vec![
            scenario(vec![expires_in(10)], vec![expect("30m", name, vec![fires])]),
            scenario(vec![expires_in(30)], vec![expect("30m", name, vec![])]),
        ],
    );
}

#[test]
fn backup_and_restore_alerts_fire_when_the_operators_gauges_go_stale() {
    // The operator's own scrape: its target labels, and the policy's labels.
    let operator = |policy: &str, endpoint: &str| -> Vec<(String, String)> {
        [
            ("namespace", "fhir-operator"),
            ("service", "fhir-operator"),
            ("pod", "fhir-operator-0"),
            ("policy_namespace", NS),
            ("policy", policy),
            ("fhir_endpoint", endpoint),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let ours = operator("nightly", EP);
    // At 60m time() is 3600. Daily schedule: max age 2 days.
    let two_days = 2 * 86_400;
    let last = |labels: &[(String, String)], at: i64| series(BACKUP_LAST_SUCCESS, labels, &[], &format!("{at}x70"));
    let max_age = |labels: &[(String, String)]| series(BACKUP_MAX_AGE, labels, &[], &format!("{two_days}x70"));
    let fires = firing(
        &spec,
        "FhirEndpointBackupStale",
        &[("policy_namespace", NS), ("policy", "nightly"), ("fhir_endpoint", EP)],
        &[("{{ $labels.policy }}", "nightly")],
    );
    let other = operator("other", "another-endpoint");
    promtool_test(
        &settings,
        vec![
            // Three days old: stale.
            scenario(
                vec![last(&ours, 3600 - 3 * 86_400), max_age(&ours)],
                vec![expect("60m", "FhirEndpointBackupStale", vec![fires])],
            ),
            // One day old: fine.
            scenario(
                vec![last(&ours, 3600 - 86_400), max_age(&ours)],
                vec![expect("60m", "FhirEndpointBackupStale", vec![])],
            ),
            // Another endpoint's stale policy is not this endpoint's alert.
            scenario(
                vec![last(&other, -3 * 86_400), max_age(&other)],
                vec![expect("60m", "FhirEndpointBackupStale", vec![])],
            ),
        ],
    );
    let verified = |at: i64| series(RESTORE_LAST_VERIFIED, &ours, &[], &format!("{at}x70"));
    let drill_max = series(RESTORE_MAX_AGE, &ours, &[], &format!("{}x70", 7 * 86_400 + 1800));
    let fires = firing(
        &spec,
        "FhirEndpointRestoreDrillStale",
        &[("policy_namespace", NS), ("policy", "nightly"), ("fhir_endpoint", EP)],
        &[("{{ $labels.policy }}", "nightly")],
    );
    promtool_test(
        &settings,
        vec![
            scenario(
                vec![verified(3600 - 8 * 86_400), drill_max.clone()],
                vec![expect("60m", "FhirEndpointRestoreDrillStale", vec![fires])],
            ),
            scenario(
                vec![verified(3600 - 6 * 86_400), drill_max],
                vec![expect("60m", "FhirEndpointRestoreDrillStale", vec![])],
            ),
        ],
    );
}

#[test]
fn rendered_rules_and_service_monitor_snapshots() {
    let settings = AlertSettings::new(NS, EP);
    insta::assert_snapshot!("prometheus_rule_groups", rule_groups_yaml(&prometheus_rule_spec(&settings)));
    let selector = BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), EP.to_owned()),
        ("app.kubernetes.io/name".to_owned(), "fhir-endpoint".to_owned()),
    ]);
    let mut monitor = ServiceMonitor::new(EP, service_monitor_spec(&settings, selector));
    monitor.metadata.namespace = Some(NS.to_owned());
    insta::assert_snapshot!("service_monitor", serde_yaml::to_string(&monitor).expect("ServiceMonitor as YAML"));
}

fn with_audit(active_hours: Option<(u8, u8)>) -> AlertSettings {
    let mut settings = AlertSettings::new(NS, EP);
    settings.audit = Some(AuditAlerts { seal_every_seconds: 300, active_hours, distinct_patients: 500 });
    settings
}

#[test]
fn client_rate_anomaly_fires_on_a_jump_above_the_clients_own_baseline_only() {
    let name = "FhirEndpointClientRateAnomaly";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let requests = |client, values| {
        series(
            REQUESTS_TOTAL,
            &labels,
            &[("client", client), ("method_class", "read"), ("status_class", "2xx")],
            values,
        )
    };
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let billing = firing(
        &spec,
        name,
        &[("namespace", NS), ("service", EP), ("client", "billing")],
        &[("{{ $labels.client }}", "billing"), ("{{ $value | humanize }}", "60")],
    );
    // billing: 1/s for 70 minutes, then 60/s. lab: 60/s all along, its
    // normal, never an anomaly.
    let input = vec![requests("billing", "0+60x70 4200+3600x30"), requests("lab", "0+3600x100")];
    promtool_test(
        &settings,
        vec![scenario(
            input,
            vec![expect("65m", name, vec![]), expect("84m", name, vec![billing]), expect("99m", name, vec![])],
        )],
    );
}

#[test]
fn auth_failure_bursts_count_401_and_403_together() {
    let name = "FhirEndpointAuthFailureBurst";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let refused = |reason, values| series(REJECTIONS_TOTAL, &labels, &[("client", ""), ("reason", reason)], values);
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let fires = firing(&spec, name, &[("namespace", NS), ("service", EP)], &[("{{ $value | humanize }}", "120")]);
    promtool_test(
        &settings,
        vec![
            scenario(
                vec![refused("unauthorized", "0+80x20"), refused("forbidden", "0+40x20")],
                vec![expect("10m", name, vec![fires])],
            ),
            scenario(
                vec![refused("unauthorized", "0+30x20"), refused("forbidden", "0+20x20")],
                vec![expect("10m", name, vec![])],
            ),
        ],
    );
}

#[test]
fn scope_denials_fire_per_client() {
    let name = "FhirEndpointScopeDenials";
    let labels = target(NS, EP, "fhir-5d8c-a");
    let denied =
        |client, values| series(REJECTIONS_TOTAL, &labels, &[("client", client), ("reason", "forbidden")], values);
    let settings = AlertSettings::new(NS, EP);
    let spec = prometheus_rule_spec(&settings);
    let billing = firing(
        &spec,
        name,
        &[("namespace", NS), ("service", EP), ("client", "billing")],
        &[("{{ $labels.client }}", "billing"), ("{{ $value | humanize }}", "20")],
    );
    let input = vec![denied("billing", "0+2x30"), denied("lab", "0+0.5x30")];
    promtool_test(&settings, vec![scenario(input, vec![expect("20m", name, vec![billing])])]);
}

#[test]
fn audit_alerts_fire_on_a_stale_seal_many_patients_and_requests_outside_hours() {
    let labels = target(NS, EP, "fhir-5d8c-a");
    let settings = with_audit(Some((7, 19)));
    let spec = prometheus_rule_spec(&settings);
    let seal = |values| series("fhir_audit_last_seal_timestamp_seconds", &labels, &[], values);
    let patients =
        |client, values| series("fhir_gateway_client_distinct_patients", &labels, &[("client", client)], values);
    let requests = |client, values| {
        series(
            REQUESTS_TOTAL,
            &labels,
            &[("client", client), ("method_class", "read"), ("status_class", "2xx")],
            values,
        )
    };
    let stale = firing(
        &spec,
        "FhirEndpointAuditSealStale",
        &[("namespace", NS), ("service", EP)],
        &[("{{ $value | humanizeDuration }}", "20m 0s")],
    );
    let many = firing(
        &spec,
        "FhirEndpointClientTouchesManyPatients",
        &[("namespace", NS), ("service", EP), ("client", "billing")],
        &[("{{ $labels.client }}", "billing"), ("{{ $value | humanize }}", "600")],
    );
    let outside = firing(
        &spec,
        "FhirEndpointRequestsOutsideActiveHours",
        &[("namespace", NS), ("service", EP), ("client", "billing")],
        &[("{{ $labels.client }}", "billing")],
    );
    // promtool's clock starts at 00:00 UTC: outside 07-19.
    promtool_test(
        &settings,
        vec![
            scenario(
                vec![
                    seal("0x30"),
                    patients("billing", "600x30"),
                    patients("lab", "100x30"),
                    requests("billing", "0+60x30"),
                ],
                vec![
                    expect("20m", "FhirEndpointAuditSealStale", vec![stale]),
                    expect("20m", "FhirEndpointClientTouchesManyPatients", vec![many]),
                    expect("20m", "FhirEndpointRequestsOutsideActiveHours", vec![outside]),
                ],
            ),
            // A seal every minute, few patients, no requests: quiet.
            scenario(
                vec![seal("0+60x30"), patients("billing", "100x30")],
                vec![
                    expect("20m", "FhirEndpointAuditSealStale", vec![]),
                    expect("20m", "FhirEndpointClientTouchesManyPatients", vec![]),
                    expect("20m", "FhirEndpointRequestsOutsideActiveHours", vec![]),
                ],
            ),
        ],
    );
    // Requests within the active hours: quiet.
    let all_day = with_audit(Some((0, 24)));
    promtool_test(
        &all_day,
        vec![scenario(
            vec![requests("billing", "0+60x30")],
            vec![expect("20m", "FhirEndpointRequestsOutsideActiveHours", vec![])],
        )],
    );
}
