//! FhirEndpoint spec → [`Validated`], or an [`InvalidSpec`] naming the field.
//!
//! The CRD schema refuses what it can; CEL rules refuse more on API servers
//! that evaluate them (1.25+). This step re-checks the CEL rules (older
//! servers drop them) and what no schema can say.

use std::fmt;

use crate::api::{AccessPeer, FhirEndpoint};

/// Environment variables the operator sets on the FHIR server container;
/// `spec.server.env` may not override them (the database settings would
/// silently stop matching `spec.database`).
pub const RESERVED_ENV: &[&str] = &[
    "HAPI_FHIR_FHIR_VERSION",
    "SPRING_DATASOURCE_URL",
    "SPRING_DATASOURCE_USERNAME",
    "SPRING_DATASOURCE_PASSWORD",
    "SPRING_DATASOURCE_DRIVERCLASSNAME",
    "SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT",
    "JAVA_TOOL_OPTIONS",
];

/// Longest endpoint name: it names the Service (a 63-character DNS label)
/// and children with suffixes such as `-gateway`.
pub const MAX_NAME_LENGTH: usize = 55;

/// A refused spec: which field, and why. Never holds secret values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    pub field: String,
    pub message: String,
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for InvalidSpec {}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec { field: field.into(), message: message.into() }
}

/// An endpoint whose spec passed validation, with parsed values.
#[derive(Debug, Clone)]
pub struct Validated<'a> {
    pub endpoint: &'a FhirEndpoint,
    pub name: String,
    pub namespace: String,
    /// `spec.monitoring.latencyP99` in seconds.
    pub latency_p99_seconds: f64,
}

pub fn validate(endpoint: &FhirEndpoint) -> Result<Validated<'_>, InvalidSpec> {
    let name = endpoint.metadata.name.clone().ok_or_else(|| invalid("metadata.name", "is required"))?;
    let namespace = endpoint
        .metadata
        .namespace
        .clone()
        .ok_or_else(|| invalid("metadata.namespace", "is required: FhirEndpoint is namespaced"))?;
    if !is_dns_label(&name) || name.len() > MAX_NAME_LENGTH {
        return Err(invalid(
            "metadata.name",
            format!(
                "{name:?} must be a DNS label of at most {MAX_NAME_LENGTH} characters starting with a letter: \
                 it names the endpoint's Service and its children"
            ),
        ));
    }
    let spec = &endpoint.spec;
    if spec.server.image.trim().is_empty() {
        return Err(invalid("spec.server.image", "must not be empty"));
    }
    if !(1..=100).contains(&spec.server.replicas) {
        return Err(invalid("spec.server.replicas", format!("{} is outside 1..100", spec.server.replicas)));
    }
    for (i, var) in spec.server.env.iter().enumerate() {
        if RESERVED_ENV.contains(&var.name.as_str()) {
            return Err(invalid(
                format!("spec.server.env[{i}].name"),
                format!("{} is set by the operator from the spec and cannot be overridden", var.name),
            ));
        }
    }
    check_peers(&spec.access.from, "spec.access.from")?;
    check_peers(&spec.monitoring.scrape_from, "spec.monitoring.scrapeFrom")?;
    let latency_p99_seconds = parse_latency(&spec.monitoring.latency_p99).ok_or_else(|| {
        invalid(
            "spec.monitoring.latencyP99",
            format!("{:?} is not a duration such as 500ms or 2s", spec.monitoring.latency_p99),
        )
    })?;
    let ratio = spec.monitoring.error_ratio;
    if !(0.0..=1.0).contains(&ratio) {
        return Err(invalid("spec.monitoring.errorRatio", format!("{ratio} is outside 0..1")));
    }
    if let Some(db) = &spec.database {
        if db.host.trim().is_empty() {
            return Err(invalid("spec.database.host", "must not be empty"));
        }
        if !(1..=65535).contains(&db.port) {
            return Err(invalid("spec.database.port", format!("{} is outside 1..65535", db.port)));
        }
    }
    Ok(Validated { endpoint, name, namespace, latency_p99_seconds })
}

fn check_peers(peers: &[AccessPeer], field: &str) -> Result<(), InvalidSpec> {
    for (i, peer) in peers.iter().enumerate() {
        if peer.namespace_selector.is_none() && peer.pod_selector.is_none() {
            return Err(invalid(format!("{field}[{i}]"), "needs namespaceSelector, podSelector or both"));
        }
    }
    Ok(())
}

/// `500ms` or `2s` → seconds.
fn parse_latency(text: &str) -> Option<f64> {
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (text.strip_suffix('s')?, 1.0),
    };
    let value: u64 = number.parse().ok()?;
    (value > 0).then_some(value as f64 * scale)
}

fn is_dns_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FhirEndpointSpec;
    use k8s_openapi::api::core::v1::EnvVar;

    fn endpoint(name: &str, spec: FhirEndpointSpec) -> FhirEndpoint {
        let mut ep = FhirEndpoint::new(name, spec);
        ep.metadata.namespace = Some("clinic".into());
        ep
    }

    #[test]
    fn defaults_are_valid() {
        let ep = endpoint("trial", FhirEndpointSpec::default());
        let v = validate(&ep).unwrap();
        assert_eq!((v.name.as_str(), v.namespace.as_str()), ("trial", "clinic"));
        assert_eq!(v.latency_p99_seconds, 0.5);
    }

    #[test]
    fn each_refusal_names_its_field() {
        type Mutation = Box<dyn Fn(&mut FhirEndpoint)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("metadata.name", Box::new(|e| e.metadata.name = Some("9lives".into()))),
            ("metadata.name", Box::new(|e| e.metadata.name = Some("a".repeat(56)))),
            ("metadata.namespace", Box::new(|e| e.metadata.namespace = None)),
            ("spec.server.image", Box::new(|e| e.spec.server.image = " ".into())),
            ("spec.server.replicas", Box::new(|e| e.spec.server.replicas = 0)),
            (
                "spec.server.env[1].name",
                Box::new(|e| {
                    e.spec.server.env = vec![
                        EnvVar { name: "TZ".into(), ..Default::default() },
                        EnvVar { name: "SPRING_DATASOURCE_URL".into(), ..Default::default() },
                    ]
                }),
            ),
            (
                "spec.access.from[0]",
                Box::new(|e| e.spec.access.from = vec![AccessPeer { namespace_selector: None, pod_selector: None }]),
            ),
            ("spec.monitoring.latencyP99", Box::new(|e| e.spec.monitoring.latency_p99 = "fast".into())),
            ("spec.monitoring.errorRatio", Box::new(|e| e.spec.monitoring.error_ratio = f64::NAN)),
        ];
        for (field, mutate) in cases {
            let mut ep = endpoint("patients", FhirEndpointSpec::default());
            mutate(&mut ep);
            let err = validate(&ep).expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().starts_with(field));
        }
    }

    #[test]
    fn latency_parses_milliseconds_and_seconds() {
        assert_eq!(parse_latency("250ms"), Some(0.25));
        assert_eq!(parse_latency("2s"), Some(2.0));
        assert_eq!(parse_latency("0s"), None);
        assert_eq!(parse_latency("2m"), None);
    }
}
