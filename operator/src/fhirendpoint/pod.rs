//! The endpoint's Deployment: the FHIR server, the nginx gateway in front
//! of it, and the gateway-metrics sidecar, every container meeting the Pod
//! Security Standard "restricted".

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::audit::{AUDIT_CONTAINER, AUDIT_MOUNT, Audit, SHUTDOWN_GRACE_SECONDS, signing_key_secret};
use super::auth::{AUTH_CONFIG_KEY, SMART_CONFIGURATION_KEY};
use super::build::{
    CONFIG_HASH_ANNOTATION, Inputs, KEYS_HASH_ANNOTATION, NGINX_CONF_KEY, TLS_HASH_ANNOTATION, gateway_config_name,
    selector_labels,
};
use super::database::{CA_DIR, CA_KEY, CA_VOLUME, SERVER_CONTAINER};
use super::gateway::{self, GatewaySettings, Limits};
use super::validate::Validated;
use crate::api::ServerFlavor;
use crate::gateway_auth;
use crate::keyrotation::keys::GATEWAY_MAP_ENTRY;
use crate::meta::hash_of;

/// The uid and gid every container runs as (the distroless "nonroot" id).
pub const RUN_AS: i64 = 65532;

const CONF_DIR: &str = "/etc/fhir-gateway/conf";
/// The gateway's writable directory (an emptyDir): pid file, temp files.
const GATEWAY_TMP: &str = "/tmp";
/// How long a terminating pod's gateway keeps serving before it stops
/// taking connections: the time the pod's removal from the Service's
/// endpoints takes to reach every node's proxy. Without it, clients of a
/// rolling update (a key rotation, a tier edit) see refused and reset
/// connections.
pub const GATEWAY_DRAIN_SECONDS: u32 = 10;
/// How long a terminating pod's Helios server keeps serving: past the
/// gateway's drain, so that requests the gateway still takes reach it.
pub const SERVER_DRAIN_SECONDS: u32 = GATEWAY_DRAIN_SECONDS + 5;

fn pre_stop(command: Vec<String>) -> Lifecycle {
    Lifecycle {
        pre_stop: Some(LifecycleHandler { exec: Some(ExecAction { command: Some(command) }), ..Default::default() }),
        ..Default::default()
    }
}
const TLS_DIR: &str = "/etc/fhir-gateway/tls";
const KEYS_DIR: &str = "/etc/fhir-gateway/keys";

/// The gateway's settings inside the pod (the paths are this module's
/// mounts), for an endpoint whose public address is `localhost:443` (the
/// builder sets the real one).
pub fn gateway_settings(limits: Limits) -> GatewaySettings {
    GatewaySettings {
        public_host: "localhost".into(),
        public_port: 443,
        listen: gateway::HTTPS_PORT.to_string(),
        upstream: format!("127.0.0.1:{}", gateway::UPSTREAM_PORT),
        tls_certificate: format!("{TLS_DIR}/tls.crt"),
        tls_certificate_key: format!("{TLS_DIR}/tls.key"),
        // One directory per KeyRotationSchedule; a glob that matches no file
        // is not an error for nginx, so an endpoint without keys still starts
        // (and answers 401 to everyone).
        api_keys_map: format!("{KEYS_DIR}/*/api-keys.map"),
        temp_dir: GATEWAY_TMP.into(),
        access_log: "/dev/stdout".into(),
        access_log_syslog: Some(gateway::SYSLOG_ADDRESS.into()),
        limits,
        auth: None,
    }
}

/// The token verifier's settings inside the pod, for an endpoint with
/// OAuth or client scopes.
pub fn gateway_auth(v: &Validated<'_>) -> Option<gateway::GatewayAuth> {
    v.auth.as_ref()?;
    let spec = &v.endpoint.spec.auth;
    let smart = spec.oauth.as_ref().and_then(|o| o.smart_configuration.as_ref());
    Some(gateway::GatewayAuth {
        verifier: format!("127.0.0.1:{}", gateway_auth::PORT),
        base_path: v.flavor.base_path().to_owned(),
        smart_configuration: smart.map(|_| format!("{CONF_DIR}/{SMART_CONFIGURATION_KEY}")),
    })
}

/// The container security context of "restricted".
pub fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

pub(crate) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

pub(crate) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.into(), key: key.into(), optional: Some(false) }),
            ..Default::default()
        }),
    }
}

pub(crate) fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), read_only: Some(true), ..Default::default() }
}

fn writable(name: &str, path: &str) -> VolumeMount {
    VolumeMount { name: name.into(), mount_path: path.into(), ..Default::default() }
}

fn empty_dir(name: &str) -> Volume {
    Volume { name: name.into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number.into(),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: &str, scheme: &str, initial_delay: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(port.into()),
            scheme: Some(scheme.into()),
            ..Default::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
    let map =
        |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned()))).collect();
    ResourceRequirements { requests: Some(map(requests)), limits: Some(map(limits)), ..Default::default() }
}

fn fhir_server(v: &Validated<'_>) -> (Container, Vec<Volume>) {
    let spec = &v.endpoint.spec;
    let mut mounts = vec![writable("server-tmp", "/tmp")];
    let mut volumes = vec![empty_dir("server-tmp")];
    let mut vars = match v.flavor {
        ServerFlavor::Hapi => hapi_env(v),
        ServerFlavor::Helios => helios_env(v),
    };
    match &v.database {
        Some(db) => {
            if let Some(ca) = &db.ca_secret {
                mounts.push(mount(CA_VOLUME, CA_DIR));
                volumes.push(ca_volume(ca));
            }
        }
        None => {
            // The embedded database writes under the working directory; on
            // an emptyDir its data lives only as long as the pod (status
            // reports it as not production-ready).
            let dir = match v.flavor {
                ServerFlavor::Hapi => "/app/target",
                ServerFlavor::Helios => HFS_EMBEDDED_DIR,
            };
            mounts.push(writable("embedded-database", dir));
            volumes.push(empty_dir("embedded-database"));
        }
    }
    vars.extend(spec.server.env.iter().cloned());
    let metadata = format!("{}/metadata", v.flavor.base_path());
    // A JVM server takes a while to start: the startup probe allows up to
    // 5 minutes before liveness counts.
    let startup_delay = match v.flavor {
        ServerFlavor::Hapi => 20,
        ServerFlavor::Helios => 1,
    };
    let container = Container {
        name: SERVER_CONTAINER.into(),
        image: Some(spec.server.image.clone()),
        ports: Some(vec![port("fhir", gateway::UPSTREAM_PORT)]),
        env: Some(vars),
        resources: Some(
            spec.server
                .resources
                .clone()
                .unwrap_or_else(|| resources(&[("cpu", "500m"), ("memory", "1Gi")], &[("memory", "2Gi")])),
        ),
        startup_probe: Some(http_probe(&metadata, "fhir", "HTTP", startup_delay, 28)),
        readiness_probe: Some(http_probe(&metadata, "fhir", "HTTP", 0, 3)),
        liveness_probe: Some(http_probe(&metadata, "fhir", "HTTP", 0, 6)),
        lifecycle: server_lifecycle(v.flavor),
        security_context: Some(restricted_container()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    (container, volumes)
}

/// hfs stops at once on SIGTERM: it sleeps through the gateway's drain
/// first (its image must have `sleep`, as Debian-based images do). HAPI's
/// image has no shell or `sleep` (distroless): its server gets SIGTERM when
/// the gateway starts draining, as before.
fn server_lifecycle(flavor: ServerFlavor) -> Option<Lifecycle> {
    match flavor {
        ServerFlavor::Hapi => None,
        ServerFlavor::Helios => Some(pre_stop(vec!["sleep".into(), SERVER_DRAIN_SECONDS.to_string()])),
    }
}

/// Where hfs keeps its embedded (SQLite) database.
const HFS_EMBEDDED_DIR: &str = "/var/lib/hfs";

/// HAPI FHIR JPA server: Spring's relaxed binding of environment variables.
fn hapi_env(v: &Validated<'_>) -> Vec<EnvVar> {
    let version =
        serde_json::to_value(v.endpoint.spec.server.fhir_version).ok().and_then(|j| j.as_str().map(str::to_owned));
    let mut vars = vec![
        env("HAPI_FHIR_FHIR_VERSION", version.unwrap_or_else(|| "R4".into())),
        // HAPI writes absolute URLs (Location, Bundle links) from this,
        // not from the request it sees behind the gateway.
        env("HAPI_FHIR_SERVER_ADDRESS", &v.public_url),
        env("JAVA_TOOL_OPTIONS", "-Djava.io.tmpdir=/tmp -XX:MaxRAMPercentage=75"),
    ];
    if let Some(db) = &v.database {
        vars.extend([
            env("SPRING_DATASOURCE_URL", &db.jdbc_url),
            secret_env("SPRING_DATASOURCE_USERNAME", &db.credentials_secret, "username"),
            secret_env("SPRING_DATASOURCE_PASSWORD", &db.credentials_secret, "password"),
            env("SPRING_DATASOURCE_DRIVERCLASSNAME", "org.postgresql.Driver"),
            env("SPRING_JPA_PROPERTIES_HIBERNATE_DIALECT", "ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect"),
        ]);
    }
    vars
}

/// The Helios FHIR Server (hfs). Its PostgreSQL settings go as separate
/// variables, not as `HFS_DATABASE_URL`: hfs 0.2.7 splits that URL as
/// plain text (no percent-decoding, the query dropped, no IPv6) and would
/// need the password inside it; `HFS_PG_*` take each value verbatim and the
/// credentials straight from the Secret.
///
/// Verified against the real hfs 0.2.7 binary by e2e/tests/fhir_server.rs:
/// with exactly this environment it uses PostgreSQL through
/// `HFS_PG_HOST/PORT/DBNAME/USER/PASSWORD` (a password with `@ : / ? # %`
/// and quotes, checked by the server), listens on
/// `HFS_SERVER_HOST:HFS_SERVER_PORT` and writes every absolute URL
/// (Location, Bundle links) from `HFS_BASE_URL`, ignoring X-Forwarded-*.
/// It reads its search parameters from `./data/search-parameters-r4.json`
/// of its working directory, which the image must provide.
fn helios_env(v: &Validated<'_>) -> Vec<EnvVar> {
    let mut vars = vec![
        env("HFS_BASE_URL", &v.public_url),
        env("HFS_SERVER_HOST", "0.0.0.0"),
        env("HFS_SERVER_PORT", gateway::UPSTREAM_PORT.to_string()),
        env("HFS_DEFAULT_FHIR_VERSION", "R4"),
        env("HFS_UI_ENABLED", "false"),
        env("HFS_NL_SEARCH_ENABLED", "false"),
        env("HFS_SEED_CONFORMANCE", "false"),
    ];
    match &v.database {
        Some(db) => vars.extend([
            env("HFS_STORAGE_BACKEND", "postgres"),
            env("HFS_PG_HOST", &db.target.host),
            env("HFS_PG_PORT", db.target.port.to_string()),
            env("HFS_PG_DBNAME", &db.target.database),
            secret_env("HFS_PG_USER", &db.credentials_secret, "username"),
            secret_env("HFS_PG_PASSWORD", &db.credentials_secret, "password"),
        ]),
        None => vars.extend([
            env("HFS_STORAGE_BACKEND", "sqlite"),
            env("HFS_DATABASE_URL", format!("{HFS_EMBEDDED_DIR}/fhir.db")),
        ]),
    }
    vars
}

/// `spec.database.caSecret`'s `ca.crt` only, read-only, group-readable.
pub(crate) fn ca_volume(secret: &str) -> Volume {
    Volume {
        name: CA_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(SECRET_MODE),
            items: Some(vec![KeyToPath { key: CA_KEY.into(), path: CA_KEY.into(), mode: None }]),
            optional: Some(false),
        }),
        ..Default::default()
    }
}

fn gateway_container(image: &str, inputs: &Inputs, audited: bool) -> Container {
    let mut mounts =
        vec![mount("gateway-config", CONF_DIR), mount("gateway-tls", TLS_DIR), writable("gateway-tmp", GATEWAY_TMP)];
    if audited {
        mounts.push(writable("gateway-logs", crate::audit::ACCESS_LOG_DIR));
    }
    mounts.extend(inputs.keys.iter().map(|k| mount(&key_volume(&k.schedule), &format!("{KEYS_DIR}/{}", k.schedule))));
    Container {
        name: "gateway".into(),
        image: Some(image.into()),
        command: Some(vec!["nginx".into()]),
        args: Some(vec!["-c".into(), format!("{CONF_DIR}/{NGINX_CONF_KEY}"), "-g".into(), "daemon off;".into()]),
        ports: Some(vec![port("https", gateway::HTTPS_PORT)]),
        resources: Some(resources(&[("cpu", "100m"), ("memory", "64Mi")], &[("memory", "256Mi")])),
        readiness_probe: Some(http_probe("/healthz", "https", "HTTPS", 0, 3)),
        liveness_probe: Some(http_probe("/healthz", "https", "HTTPS", 10, 6)),
        // Keep serving while the endpoints update, then quit gracefully
        // (in-flight requests finish; SIGTERM would cut them) and wait for
        // the master to go.
        lifecycle: Some(pre_stop(vec![
            "sh".into(),
            "-c".into(),
            format!(
                "sleep {GATEWAY_DRAIN_SECONDS}; nginx -c {CONF_DIR}/{NGINX_CONF_KEY} -s quit; \
                 while [ -e {GATEWAY_TMP}/nginx.pid ]; do sleep 0.2; done"
            ),
        ])),
        security_context: Some(restricted_container()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

fn metrics_container(image: &str) -> Container {
    Container {
        name: "gateway-metrics".into(),
        image: Some(image.into()),
        args: Some(vec!["gateway-metrics".into(), "--tls-certificate".into(), format!("{TLS_DIR}/tls.crt")]),
        ports: Some(vec![port("metrics", gateway::METRICS_PORT)]),
        resources: Some(resources(&[("cpu", "20m"), ("memory", "32Mi")], &[("memory", "64Mi")])),
        readiness_probe: Some(http_probe("/healthz", "metrics", "HTTP", 0, 3)),
        security_context: Some(restricted_container()),
        volume_mounts: Some(vec![mount("gateway-tls", TLS_DIR)]),
        ..Default::default()
    }
}

/// The audit sidecar: follows nginx's access log on the shared emptyDir,
/// chains and signs it to the destination, and serves the gateway's
/// metrics from the same lines (in place of `gateway-metrics`).
fn audit_container(image: &str, audit: &Audit, endpoint: &str) -> Container {
    let mut args = vec![
        "audit-sidecar".to_owned(),
        "--tls-certificate".to_owned(),
        format!("{TLS_DIR}/tls.crt"),
        "--shutdown-grace".to_owned(),
        format!("{SHUTDOWN_GRACE_SECONDS}s"),
    ];
    args.extend(crate::audit::sidecar_args(
        &audit.seal_every_text,
        &audit.retention_text,
        &audit.destination.agent_flags(AUDIT_MOUNT),
    ));
    let mut mounts = vec![
        mount("gateway-tls", TLS_DIR),
        writable("gateway-logs", crate::audit::ACCESS_LOG_DIR),
        mount("audit-key", crate::audit::SIGNING_KEY_DIR),
    ];
    let mut env_vars = Vec::new();
    if audit.destination.persistent_volume_claim.is_some() {
        mounts.push(writable("audit", AUDIT_MOUNT));
    }
    if let Some(s3) = &audit.destination.s3 {
        env_vars.push(secret_env(crate::storage::ACCESS_KEY_ENV, &s3.credentials_secret, "accessKeyId"));
        env_vars.push(secret_env(crate::storage::SECRET_KEY_ENV, &s3.credentials_secret, "secretAccessKey"));
    }
    let _ = endpoint;
    Container {
        name: AUDIT_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(args),
        env: (!env_vars.is_empty()).then_some(env_vars),
        ports: Some(vec![port("metrics", gateway::METRICS_PORT)]),
        resources: Some(resources(&[("cpu", "50m"), ("memory", "64Mi")], &[("memory", "256Mi")])),
        readiness_probe: Some(http_probe("/healthz", "metrics", "HTTP", 0, 3)),
        security_context: Some(restricted_container()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Name of the token verifier's container.
pub const AUTH_CONTAINER: &str = "gateway-auth";

/// The token verifier: reads its configuration (scopes and issuers' public
/// keys) from the gateway's ConfigMap, and again when the kubelet updates
/// the file; listens on loopback only, for nginx.
fn auth_container(image: &str) -> Container {
    Container {
        name: AUTH_CONTAINER.into(),
        image: Some(image.into()),
        args: Some(vec!["gateway-auth".into(), "--config".into(), format!("{CONF_DIR}/{AUTH_CONFIG_KEY}")]),
        resources: Some(resources(&[("cpu", "20m"), ("memory", "32Mi")], &[("memory", "128Mi")])),
        security_context: Some(restricted_container()),
        volume_mounts: Some(vec![mount("gateway-config", CONF_DIR)]),
        ..Default::default()
    }
}

fn key_volume(schedule: &str) -> String {
    format!("keys-{schedule}")
}

/// Files from Secrets are readable by the pod's group only.
pub(crate) const SECRET_MODE: i32 = 0o440;

/// The endpoint's Deployment.
pub fn deployment(v: &Validated<'_>, metadata: ObjectMeta, inputs: &Inputs, config_hash: &str) -> Deployment {
    let (server, mut volumes) = fhir_server(v);
    volumes.extend([
        Volume {
            name: "gateway-config".into(),
            config_map: Some(ConfigMapVolumeSource { name: gateway_config_name(&v.name), ..Default::default() }),
            ..Default::default()
        },
        Volume {
            name: "gateway-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(inputs.tls_secret.clone()),
                default_mode: Some(SECRET_MODE),
                ..Default::default()
            }),
            ..Default::default()
        },
        empty_dir("gateway-tmp"),
    ]);
    if let Some(audit) = &v.audit {
        volumes.push(empty_dir("gateway-logs"));
        volumes.push(Volume {
            name: "audit-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(signing_key_secret(&v.name)),
                default_mode: Some(SECRET_MODE),
                // The private key only.
                items: Some(vec![KeyToPath {
                    key: crate::audit::SIGNING_KEY_ENTRY.into(),
                    path: crate::audit::SIGNING_KEY_ENTRY.into(),
                    mode: None,
                }]),
                optional: None,
            }),
            ..Default::default()
        });
        if let Some(pvc) = &audit.destination.persistent_volume_claim {
            volumes.push(Volume {
                name: "audit".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc.claim_name.clone(),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
    }
    volumes.extend(inputs.keys.iter().map(|k| Volume {
        name: key_volume(&k.schedule),
        secret: Some(SecretVolumeSource {
            secret_name: Some(k.secret_name.clone()),
            default_mode: Some(SECRET_MODE),
            // Only the gateway's map of accepted tokens: no other entry of
            // the Secret (the tokens by client, retired versions) is mounted.
            items: Some(vec![KeyToPath { key: GATEWAY_MAP_ENTRY.into(), path: GATEWAY_MAP_ENTRY.into(), mode: None }]),
            // The schedule's controller creates the Secret; until it does,
            // the gateway starts and refuses that schedule's clients.
            optional: Some(true),
        }),
        ..Default::default()
    }));
    let fingerprints: Vec<(&str, &str)> =
        inputs.keys.iter().map(|k| (k.schedule.as_str(), k.versions_fingerprint.as_str())).collect();
    let annotations = BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned()),
        (TLS_HASH_ANNOTATION.to_owned(), inputs.tls_fingerprint.clone()),
        (KEYS_HASH_ANNOTATION.to_owned(), hash_of(&fingerprints)),
    ]);
    let selector = selector_labels(&v.name);
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(v.endpoint.spec.server.replicas),
            revision_history_limit: Some(3),
            selector: LabelSelector { match_labels: Some(selector.clone()), ..Default::default() },
            // Never fewer serving pods than asked for during a rollout: a
            // key rotation or config change must not cause downtime.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(selector),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(v.name.clone()),
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod()),
                    containers: [
                        server,
                        gateway_container(&inputs.images.gateway, inputs, v.audit.is_some()),
                        match &v.audit {
                            Some(audit) => audit_container(&inputs.images.metrics, audit, &v.name),
                            None => metrics_container(&inputs.images.metrics),
                        },
                    ]
                    .into_iter()
                    .chain(v.auth.is_some().then(|| auth_container(&inputs.images.metrics)))
                    .collect(),
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether the Deployment's rollout is complete, as `kubectl rollout status`
/// decides it: the controller saw the latest template, `wanted` pods run
/// it, none of an older template is left, and every updated pod is
/// available. Ready pods alone prove nothing: during a rollout the old pod
/// is still ready while the new one starts.
pub fn rollout_complete(deployment: &Deployment, wanted: i32) -> bool {
    let Some(status) = &deployment.status else { return false };
    let updated = status.updated_replicas.unwrap_or(0);
    deployment.metadata.generation <= status.observed_generation
        && updated >= wanted
        && status.replicas.unwrap_or(0) <= updated
        && status.available_replicas.unwrap_or(0) >= updated
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    use super::*;

    fn deployment(generation: i64, observed: i64, replicas: i32, updated: i32, available: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(generation), ..Default::default() },
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(available),
                available_replicas: Some(available),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_rollout_is_complete_only_once_no_old_pod_is_left_and_the_new_ones_are_available() {
        // The new template not yet seen by the Deployment controller.
        assert!(!rollout_complete(&deployment(3, 2, 1, 1, 1), 1));
        // Seen: the new pod starts, the old one is still ready and available.
        assert!(!rollout_complete(&deployment(3, 3, 2, 1, 1), 1));
        // The new pod available, the old one not yet gone.
        assert!(!rollout_complete(&deployment(3, 3, 2, 1, 2), 1));
        // Only the new pod left, not yet available.
        assert!(!rollout_complete(&deployment(3, 3, 1, 1, 0), 1));
        assert!(rollout_complete(&deployment(3, 3, 1, 1, 1), 1));
        assert!(rollout_complete(&deployment(3, 3, 2, 2, 2), 2));
        assert!(!rollout_complete(&Deployment::default(), 1));
    }
}
