//! Properties over arbitrary input, with proptest:
//! - every database spec the operator accepts renders a JDBC URL that
//!   parses back (pgjdbc's rules) to exactly the host, port, database and
//!   sslmode asked for; whatever it refuses names a `spec.database` field;
//! - arbitrary specs of every kind, and arbitrary YAML given to `render`,
//!   never panic validation or building.
//!
//! Each property runs 64 cases by default, a few seconds in all, so that it
//! runs in `make test`; `PROPTEST_CASES=100000 cargo nextest run -p
//! fhir-operator --test properties` runs it longer.

use std::net::Ipv6Addr;

use fhir_operator::api::{
    BackupPolicySpec, DatabaseSpec, FhirEndpoint, FhirEndpointSpec, KeyRotationScheduleSpec, RateLimitTierSpec, SslMode,
};
use fhir_operator::discovery::{Capabilities, PdbApi};
use fhir_operator::fhirendpoint::build::{self, Images, Inputs};
use fhir_operator::fhirendpoint::database::{self, parse_jdbc};
use fhir_operator::fhirendpoint::validate::validate;
use fhir_operator::meta::owner_ref;
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn endpoint(spec: FhirEndpointSpec) -> FhirEndpoint {
    let mut ep = FhirEndpoint::new("patients", spec);
    ep.metadata.namespace = Some("clinical".into());
    ep
}

fn inputs() -> Inputs {
    Inputs {
        tier: None,
        keys: Vec::new(),
        tls_secret: "patients-tls".into(),
        tls_fingerprint: "fp".into(),
        capabilities: Capabilities { monitoring: true, pdb: PdbApi::V1 },
        images: Images::default(),
        jwks: Vec::new(),
        audit_public_key: None,
        key_hints: None,
    }
}

fn ssl_mode() -> impl Strategy<Value = SslMode> {
    prop_oneof![Just(SslMode::Disable), Just(SslMode::Require), Just(SslMode::VerifyCa), Just(SslMode::VerifyFull)]
}

/// Hosts the operator accepts: DNS subdomains (not all digits: those must
/// be IPv4 addresses), IPv4 and bare IPv6.
fn good_host() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec("[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", 0..4)
            .prop_flat_map(|labels| ("[a-z]([-a-z0-9]{0,20}[a-z0-9])?", Just(labels)))
            .prop_map(|(first, rest)| std::iter::once(first).chain(rest).collect::<Vec<_>>().join(".")),
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3])),
        any::<[u16; 8]>().prop_map(|s| Ipv6Addr::from(s).to_string()),
    ]
}

/// Anything at all, weighted towards the characters that break URLs.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9./?#&@%:=+ '\"\\\\\n\t\\[\\]-]{0,40}", any::<String>(), "[a-z]{250,300}",]
}

fn database(host: String, port: i32, name: String, mode: SslMode, ca: bool) -> DatabaseSpec {
    DatabaseSpec {
        host,
        port,
        name,
        credentials_secret: "patients-db".into(),
        ssl_mode: mode,
        ca_secret: ca.then(|| "patients-db-ca".into()),
    }
}

/// The `SPRING_DATASOURCE_URL` of the built Deployment.
fn rendered_jdbc_url(ep: &FhirEndpoint) -> Option<String> {
    let v = validate(ep).ok()?;
    let children = build::build(&v, owner_ref(ep), &inputs()).ok()?;
    let pod = children.deployment.spec?.template.spec?;
    let server = pod.containers.into_iter().find(|c| c.name == database::SERVER_CONTAINER)?;
    server.env?.into_iter().find(|e| e.name == "SPRING_DATASOURCE_URL")?.value
}

fn same_host(asked: &str, parsed: &str) -> bool {
    match (asked.parse::<Ipv6Addr>(), parsed.parse::<Ipv6Addr>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => asked == parsed,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_databases_render_urls_that_parse_back_exactly(
        host in good_host(),
        port in 1i32..=65535,
        name in "[A-Za-z_][A-Za-z0-9_$-]{0,62}",
        mode in ssl_mode(),
        ca in any::<bool>(),
    ) {
        let spec = FhirEndpointSpec {
            database: Some(database(host.clone(), port, name.clone(), mode, ca)),
            ..Default::default()
        };
        let ep = endpoint(spec);
        prop_assert!(validate(&ep).is_ok(), "{:?}", validate(&ep).err());
        let url = rendered_jdbc_url(&ep).expect("a JDBC URL");
        let parsed = parse_jdbc(&url).expect("pgjdbc parses it");
        prop_assert!(same_host(&host, &parsed.host), "{url}");
        prop_assert_eq!(i32::from(parsed.port), port);
        prop_assert_eq!(&parsed.database, &name);
        prop_assert_eq!(parsed.ssl_mode.as_str(), database::ssl_mode(mode));
        prop_assert_eq!(parsed.root_cert, ca.then(database::ca_path));
    }

    #[test]
    fn any_database_is_refused_naming_its_field_or_parses_back_exactly(
        host in prop_oneof![good_host(), hostile()],
        port in prop_oneof![1i32..=65535, any::<i32>()],
        name in prop_oneof!["[A-Za-z_][A-Za-z0-9_$-]{0,62}".boxed(), hostile().boxed()],
        mode in ssl_mode(),
    ) {
        let ep = endpoint(FhirEndpointSpec {
            database: Some(database(host.clone(), port, name.clone(), mode, true)),
            ..Default::default()
        });
        match validate(&ep) {
            Err(e) => prop_assert!(e.field.starts_with("spec.database."), "{e}"),
            Ok(_) => {
                let parsed = parse_jdbc(&rendered_jdbc_url(&ep).expect("a JDBC URL")).expect("parses");
                prop_assert!(same_host(&host, &parsed.host));
                prop_assert_eq!(i32::from(parsed.port), port);
                prop_assert_eq!(parsed.database, name);
            }
        }
    }

    #[test]
    fn arbitrary_endpoint_specs_never_panic_validate_or_build(spec in arbitrary_spec("FhirEndpoint")) {
        if let Ok(spec) = serde_json::from_value::<FhirEndpointSpec>(spec) {
            let ep = endpoint(spec);
            if let Ok(v) = validate(&ep) {
                let _ = build::build(&v, owner_ref(&ep), &inputs());
            }
        }
    }

    #[test]
    fn arbitrary_backup_policies_never_panic(spec in arbitrary_spec("BackupPolicy")) {
        if let Ok(spec) = serde_json::from_value::<BackupPolicySpec>(spec) {
            let _ = fhir_operator::backup::plan::settings(&spec);
        }
    }

    #[test]
    fn arbitrary_key_schedules_never_panic(spec in arbitrary_spec("KeyRotationSchedule")) {
        if let Ok(spec) = serde_json::from_value::<KeyRotationScheduleSpec>(spec) {
            let _ = fhir_operator::keyrotation::rotation::settings(&spec);
        }
    }

    #[test]
    fn arbitrary_tiers_never_panic(spec in arbitrary_spec("RateLimitTier")) {
        if let Ok(spec) = serde_json::from_value::<RateLimitTierSpec>(spec) {
            let _ = fhir_operator::ratelimittier::validate(&spec);
        }
    }

    #[test]
    fn arbitrary_yaml_never_panics_render(text in prop_oneof![
        any::<String>(),
        arbitrary_spec("FhirEndpoint").prop_map(|spec| serde_yaml::to_string(&json!({
            "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
            "metadata": {"name": "patients"}, "spec": spec,
        })).unwrap_or_default()),
    ]) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("input.yaml");
        std::fs::write(&file, text).expect("write");
        let _ = fhir_operator::render::render(&render_args(file));
    }
}

fn render_args(file: std::path::PathBuf) -> fhir_operator::render::RenderArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: fhir_operator::render::RenderArgs,
    }
    Cli::parse_from(["render", "-f", file.to_str().expect("UTF-8 path"), "--allow-missing"]).args
}

/// A JSON value for one spec: the kind's real field names (so that much of
/// it deserializes) with arbitrary values, plus stray fields.
fn arbitrary_spec(kind: &'static str) -> impl Strategy<Value = Value> {
    let fields: &'static [&'static str] = match kind {
        "FhirEndpoint" => &[
            "server.image",
            "server.flavor",
            "server.fhirVersion",
            "server.replicas",
            "server.env",
            "publicUrl",
            "database.host",
            "database.port",
            "database.name",
            "database.credentialsSecret",
            "database.sslMode",
            "database.caSecret",
            "tls.secretName",
            "auth.apiKeys",
            "rateLimit.tier",
            "monitoring.latencyP99",
            "monitoring.errorRatio",
        ],
        "BackupPolicy" => &[
            "endpoint",
            "schedule",
            "destination.s3.bucket",
            "destination.s3.prefix",
            "destination.s3.endpoint",
            "destination.s3.credentialsSecret",
            "destination.persistentVolumeClaim.claimName",
            "destination.persistentVolumeClaim.path",
            "encryption.keySchedule",
            "retention.keepLast",
            "retention.maxAge",
            "restoreDrill.schedule",
        ],
        "KeyRotationSchedule" => {
            &["algorithm", "clients", "schedule", "interval", "gracePeriod", "keepVersions", "secretName"]
        }
        _ => &["requestsPerSecond", "burst", "read.requestsPerSecond", "write.burst", "maxRequestBodySize", "key"],
    };
    proptest::collection::vec((proptest::sample::select(fields), leaf()), 0..12).prop_map(|pairs| {
        let mut root = json!({});
        for (path, value) in pairs {
            let mut node = &mut root;
            let parts: Vec<&str> = path.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                if !node[*part].is_object() {
                    node[*part] = json!({});
                }
                node = &mut node[*part];
            }
            node[parts[parts.len() - 1]] = value;
        }
        root
    })
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        hostile().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        any::<bool>().prop_map(Value::from),
        Just(json!(["a", "B", "c/d"])),
        Just(json!([{"name": "X Y", "value": "1"}, {"name": "HFS_BASE_URL"}])),
        prop_oneof![Just("R4"), Just("R5"), Just("hapi"), Just("helios"), Just("verify-full"), Just("api-key")]
            .prop_map(Value::from),
        Just(json!("0 3 * * *")),
        Just(json!("30d")),
    ]
}
