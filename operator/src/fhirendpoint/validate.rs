//! FhirEndpoint spec → [`Validated`], or an [`InvalidSpec`] naming the field.
//!
//! The CRD schema refuses what it can; CEL rules refuse more on API servers
//! that evaluate them (1.25+). This step re-checks the CEL rules (older
//! servers drop them) and what no schema can say.

use std::fmt;

use super::database::{self, Target};
use crate::api::{AccessPeer, DEFAULT_SERVER_IMAGE, FhirEndpoint, FhirVersion, ServerFlavor};
use crate::validation;

/// Environment variables the operator sets on the FHIR server container,
/// whichever the flavor; `spec.server.env` may not override them (the
/// database settings or the public address would silently stop matching
/// the spec, and status would describe a connection that is not made).
pub const RESERVED_ENV: &[&str] = &[
    "HAPI_FHIR_FHIR_VERSION",
    "HAPI_FHIR_SERVER_ADDRESS",
    "SPRING_DATASOURCE_URL",
    "SPRING_DATASOURCE_USERNAME",
    "SPRING_DATASOURCE_PASSWORD",
    "SPRING_DATASOURCE_DRIVERCLASSNAME",
    "SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT",
    "JAVA_TOOL_OPTIONS",
    "HFS_STORAGE_BACKEND",
    "HFS_DATABASE_URL",
    "HFS_PG_HOST",
    "HFS_PG_PORT",
    "HFS_PG_DBNAME",
    "HFS_PG_USER",
    "HFS_PG_PASSWORD",
    "HFS_BASE_URL",
    "HFS_SERVER_HOST",
    "HFS_SERVER_PORT",
    "HFS_DEFAULT_FHIR_VERSION",
    "HFS_UI_ENABLED",
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
    pub flavor: ServerFlavor,
    /// The address clients use, without a trailing `/`.
    pub public_url: String,
    /// Its host (IPv6 in brackets) and port, for the gateway's
    /// `X-Forwarded-Host` and `X-Forwarded-Port`.
    pub public_host: String,
    pub public_port: u16,
    /// The external database, checked, with its connection built.
    pub database: Option<Database>,
    /// OAuth issuers and client scopes, checked (`None`: API keys only).
    pub auth: Option<super::auth::Auth>,
    /// The audit trail's settings, checked.
    pub audit: Option<super::audit::Audit>,
}

/// An external database that passed validation.
#[derive(Debug, Clone)]
pub struct Database {
    pub target: Target,
    /// What the FHIR server (hapi) is given, built by [`database::jdbc_url`].
    pub jdbc_url: String,
    pub credentials_secret: String,
    pub ca_secret: Option<String>,
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
    validation::image_reference(&spec.server.image)
        .map_err(|e| invalid("spec.server.image", quoted(&spec.server.image, &e)))?;
    let flavor = spec.server.flavor;
    if flavor == ServerFlavor::Helios {
        if spec.server.image == DEFAULT_SERVER_IMAGE {
            return Err(invalid(
                "spec.server.image",
                "flavor helios needs the Helios FHIR Server's image: the default is a HAPI image",
            ));
        }
        if spec.server.fhir_version != FhirVersion::R4 {
            return Err(invalid("spec.server.fhirVersion", "flavor helios serves R4 only"));
        }
    }
    if !(1..=100).contains(&spec.server.replicas) {
        return Err(invalid("spec.server.replicas", format!("{} is outside 1..100", spec.server.replicas)));
    }
    for (i, var) in spec.server.env.iter().enumerate() {
        validation::env_name(&var.name)
            .map_err(|e| invalid(format!("spec.server.env[{i}].name"), quoted(&var.name, &e)))?;
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
    let references = [
        ("spec.tls.secretName", spec.tls.as_ref().map(|t| &t.secret_name)),
        ("spec.rateLimit.tier", spec.rate_limit.as_ref().map(|r| &r.tier)),
    ];
    for (field, value) in references {
        if let Some(value) = value {
            validation::dns_subdomain(value).map_err(|e| invalid(field, quoted(value, &e)))?;
        }
    }
    for (i, schedule) in spec.auth.api_keys.iter().enumerate() {
        validation::dns_subdomain(schedule)
            .map_err(|e| invalid(format!("spec.auth.apiKeys[{i}]"), quoted(schedule, &e)))?;
    }
    let auth = super::auth::check(&spec.auth)?;
    let audit = super::audit::check(spec.audit.as_ref())?;
    let database = match &spec.database {
        Some(db) => Some(check_database(db)?),
        None => None,
    };
    let (public_url, public_host, public_port) = public_address(&name, &namespace, spec.public_url.as_deref(), flavor)?;
    Ok(Validated {
        endpoint,
        name,
        namespace,
        latency_p99_seconds,
        flavor,
        public_url,
        public_host,
        public_port,
        database,
        auth,
        audit,
    })
}

/// A refused value in a message: Debug-quoted (control characters escaped)
/// and cut to a readable length.
fn quoted(value: &str, why: &str) -> String {
    let shown: String = value.chars().take(80).collect();
    let more = if shown.len() < value.len() { "..." } else { "" };
    format!("{shown:?}{more} {why}")
}

/// Checks every field that reaches a connection, and builds it.
pub fn check_database(db: &crate::api::DatabaseSpec) -> Result<Database, InvalidSpec> {
    validation::database_host(&db.host).map_err(|e| invalid("spec.database.host", quoted(&db.host, &e)))?;
    let port = u16::try_from(db.port)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| invalid("spec.database.port", format!("{} is outside 1..65535", db.port)))?;
    validation::database_name(&db.name).map_err(|e| invalid("spec.database.name", quoted(&db.name, &e)))?;
    validation::dns_subdomain(&db.credentials_secret)
        .map_err(|e| invalid("spec.database.credentialsSecret", quoted(&db.credentials_secret, &e)))?;
    if let Some(ca) = &db.ca_secret {
        validation::dns_subdomain(ca).map_err(|e| invalid("spec.database.caSecret", quoted(ca, &e)))?;
    }
    let target = Target {
        host: db.host.clone(),
        port,
        database: db.name.clone(),
        ssl_mode: database::ssl_mode(db.ssl_mode).to_owned(),
        root_cert: db.ca_secret.as_ref().map(|_| database::ca_path()),
    };
    let jdbc_url = database::jdbc_url(&target)
        .map_err(|e| invalid("spec.database.host", format!("cannot be part of a connection URL: {e}")))?;
    Ok(Database {
        target,
        jdbc_url,
        credentials_secret: db.credentials_secret.clone(),
        ca_secret: db.ca_secret.clone(),
    })
}

/// The public URL (given or the default), its host and port.
fn public_address(
    name: &str,
    namespace: &str,
    given: Option<&str>,
    flavor: ServerFlavor,
) -> Result<(String, String, u16), InvalidSpec> {
    let base = flavor.base_path();
    let default = format!("https://{name}.{namespace}.svc{base}");
    let text = given.unwrap_or(&default);
    let url = validation::public_url(text).map_err(|e| invalid("spec.publicUrl", quoted(text, &e)))?;
    let path = url.path().trim_end_matches('/');
    if path != base {
        let want = if base.is_empty() { "no path".to_owned() } else { format!("the path {base}") };
        return Err(invalid(
            "spec.publicUrl",
            format!(
                "{} must have {want}: the server serves FHIR there and the gateway does not rewrite paths",
                quoted(text, "").trim_end()
            ),
        ));
    }
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        Some(host) => host.to_string(),
        None => return Err(invalid("spec.publicUrl", "must have a host")),
    };
    let port = url.port_or_known_default().unwrap_or(443);
    Ok((url.as_str().trim_end_matches('/').to_owned(), host, port))
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
            ("spec.server.image", Box::new(|e| e.spec.server.image = "a b".into())),
            ("spec.server.image", Box::new(|e| e.spec.server.flavor = ServerFlavor::Helios)),
            ("spec.publicUrl", Box::new(|e| e.spec.public_url = Some("http://x/fhir".into()))),
            ("spec.publicUrl", Box::new(|e| e.spec.public_url = Some("https://x/other".into()))),
            (
                "spec.database.host",
                Box::new(|e| e.spec.database = Some(db("evil.example/fhir?sslmode=disable&x=", "fhir"))),
            ),
            ("spec.database.name", Box::new(|e| e.spec.database = Some(db("db", "fhir?sslmode=disable")))),
            (
                "spec.rateLimit.tier",
                Box::new(|e| e.spec.rate_limit = Some(crate::api::RateLimitRef { tier: "Gold".into() })),
            ),
            ("spec.auth.apiKeys[0]", Box::new(|e| e.spec.auth.api_keys = vec!["a/b".into()])),
            (
                "spec.server.env[0].name",
                Box::new(|e| e.spec.server.env = vec![EnvVar { name: "A B".into(), ..Default::default() }]),
            ),
            (
                "spec.server.env[0].name",
                Box::new(|e| e.spec.server.env = vec![EnvVar { name: "HFS_BASE_URL".into(), ..Default::default() }]),
            ),
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

    fn db(host: &str, name: &str) -> crate::api::DatabaseSpec {
        crate::api::DatabaseSpec {
            host: host.into(),
            port: 5432,
            name: name.into(),
            credentials_secret: "creds".into(),
            ssl_mode: crate::api::SslMode::VerifyFull,
            ca_secret: None,
        }
    }

    #[test]
    fn public_url_defaults_to_the_service_with_the_base_path() {
        let ep = endpoint("patients", FhirEndpointSpec::default());
        let v = validate(&ep).unwrap();
        assert_eq!(v.public_url, "https://patients.clinic.svc/fhir");
        assert_eq!((v.public_host.as_str(), v.public_port), ("patients.clinic.svc", 443));
        let mut ep = endpoint("patients", FhirEndpointSpec::default());
        ep.spec.server.flavor = ServerFlavor::Helios;
        ep.spec.server.image = "ghcr.io/heliossoftware/hfs:0.2.7".into();
        ep.spec.public_url = Some("https://localhost:8443/".into());
        let v = validate(&ep).unwrap();
        assert_eq!((v.public_url.as_str(), v.public_port), ("https://localhost:8443", 8443));
    }

    #[test]
    fn latency_parses_milliseconds_and_seconds() {
        assert_eq!(parse_latency("250ms"), Some(0.25));
        assert_eq!(parse_latency("2s"), Some(2.0));
        assert_eq!(parse_latency("0s"), None);
        assert_eq!(parse_latency("2m"), None);
    }
}
