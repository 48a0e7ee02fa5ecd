//! One reconciliation of a FhirEndpoint: dereference → validate → build →
//! apply → status. Writes only what changed; status only when it changed.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use tracing::{info, instrument, warn};

use super::build::{self, Children, Images, Inputs, KeySource};
use super::compliance::{self, BackupFact, Facts, KeyScheduleFact, TlsFact};
use super::database::{self, CA_KEY};
use super::monitoring::{PrometheusRule, ServiceMonitor};
use super::validate::{InvalidSpec, Validated, validate};
use super::{audit_check, auth, jwks, network, pod, tls};
use crate::api::{
    BackupOutcome, BackupPolicy, FhirEndpoint, FhirEndpointStatus, KeyAlgorithm, KeyRotationSchedule,
    KeyVersionsInForce, RateLimitTier, SslMode, condition, reason,
};
use crate::apply::{Applier, ChildKind, WriteReason, apply_status, publish_event};
use crate::conditions::{self, Clock, Desired};
use crate::discovery::{Capabilities, PdbApi, PodDisruptionBudgetV1beta1};
use crate::keyrotation::{self, rotation};
use crate::meta::{child_meta, owner_ref};
use crate::metrics::{SharedMetrics, WriteLabels};

/// The field manager of this controller's writes.
pub const FIELD_MANAGER: &str = "fhir-operator/fhirendpoint";
pub const CONTROLLER: &str = "fhirendpoint";

/// Reasons of this controller's conditions and events.
pub mod reasons {
    pub const AVAILABLE: &str = "Available";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const TIER_NOT_FOUND: &str = "TierNotFound";
    pub const TIER_INVALID: &str = "TierInvalid";
    /// The audit signing key Secret cannot be read or made.
    pub const AUDIT_KEY_UNUSABLE: &str = "AuditKeyUnusable";
    pub const KEY_SCHEDULE_NOT_FOUND: &str = "KeyScheduleNotFound";
    pub const TLS_SECRET_UNUSABLE: &str = "TlsSecretUnusable";
    pub const MONITORING_NOT_SERVED: &str = "MonitoringNotServed";
    pub const PDB_NOT_SERVED: &str = "PodDisruptionBudgetNotServed";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const CREATED: &str = "Created";
    pub const UPDATED: &str = "Updated";
    pub const DRIFT_CORRECTED: &str = "DriftCorrected";
}

/// The caches a reconcile reads instead of asking the API server.
#[derive(Clone)]
pub struct Caches {
    pub tiers: Store<RateLimitTier>,
    pub key_schedules: Store<KeyRotationSchedule>,
    pub backups: Store<BackupPolicy>,
    pub service_accounts: Store<ServiceAccount>,
    pub config_maps: Store<ConfigMap>,
    pub secrets: Store<Secret>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub network_policies: Store<NetworkPolicy>,
    pub pdbs: Option<Store<PodDisruptionBudget>>,
    pub pdbs_v1beta1: Option<Store<PodDisruptionBudgetV1beta1>>,
    pub service_monitors: Option<Store<ServiceMonitor>>,
    pub prometheus_rules: Option<Store<PrometheusRule>>,
}

/// Shared by every reconcile of this controller.
pub struct Context {
    pub applier: Applier,
    pub caches: Caches,
    pub capabilities: RwLock<Capabilities>,
    pub images: Images,
    pub jwks: Arc<super::jwks::JwksCache>,
    /// Where gateways report unknown signing keys; `None`: nowhere.
    pub key_hints: Option<super::auth::KeyHints>,
    pub audit_checks: Arc<super::audit_check::AuditChecks>,
    pub clock: Arc<dyn Clock>,
    pub metrics: SharedMetrics,
    pub recorder: Recorder,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what}: {source}")]
    Dereference { what: String, source: kube::Error },
    #[error("applying {kind} {name}: {source}")]
    Apply { kind: String, name: String, source: kube::Error },
    #[error("deleting {kind} {name}: {source}")]
    Remove { kind: String, name: String, source: kube::Error },
    #[error("writing status: {0}")]
    Status(kube::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

impl Error {
    /// The metric category.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Dereference { .. } => "dereference",
            Error::Apply { .. } | Error::Remove { .. } => "apply",
            Error::Status(_) => "status",
            Error::Tls(_) => "tls",
        }
    }
}

/// After a failed reconcile: count it and retry soon.
pub fn error_policy(endpoint: Arc<FhirEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.category());
    warn!(namespace = endpoint.namespace().unwrap_or_default(), name = endpoint.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

#[instrument(skip_all, fields(kind = "FhirEndpoint", namespace = %ep.namespace().unwrap_or_default(), name = %ep.name_any(), generation = ep.metadata.generation.unwrap_or_default()))]
pub async fn reconcile(ep: Arc<FhirEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = run(&ep, &ctx).await;
    ctx.metrics.observe(CONTROLLER, started.elapsed());
    result
}

/// Why the endpoint cannot be configured as asked (the rest keeps serving).
struct Blocked {
    reason: &'static str,
    message: String,
}

async fn run(ep: &FhirEndpoint, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let v = match validate(ep) {
        Ok(v) => v,
        Err(invalid) => return refuse(ep, ctx, invalid, now).await,
    };
    let capabilities = ctx.capabilities.read().map(|c| *c).unwrap_or_default();

    // Dereference.
    let tier = match &ep.spec.rate_limit {
        Some(r) => match ctx.caches.tiers.get(&ObjectRef::new(&r.tier)) {
            Some(t) => match crate::ratelimittier::validate(&t.spec) {
                Ok(_) => Some(t.spec.clone()),
                // Nothing is rendered from a tier the gateway cannot enforce;
                // the endpoint keeps its last configuration.
                Err(e) => {
                    let blocked = Blocked {
                        reason: reasons::TIER_INVALID,
                        message: format!("RateLimitTier {:?} (spec.rateLimit.tier) is invalid: {e}", r.tier),
                    };
                    return block(&v, ctx, blocked, now).await;
                }
            },
            None => {
                let blocked = Blocked {
                    reason: reasons::TIER_NOT_FOUND,
                    message: format!("RateLimitTier {:?} (spec.rateLimit.tier) does not exist", r.tier),
                };
                return block(&v, ctx, blocked, now).await;
            }
        },
        None => None,
    };
    let KeyLookups { sources: keys, facts: key_facts, versions: key_versions, recheck: key_recheck } =
        match key_sources(&v, &ctx.caches.key_schedules, now) {
            Ok(found) => found,
            Err(invalid) => return refuse(ep, ctx, invalid, now).await,
        };
    let owner = owner_ref(ep);
    // What this reconcile wrote, for one summary event.
    let mut written = Vec::new();
    let (tls_secret, tls_fact, renew_at) = certificate(&v, ctx, &owner, now, &mut written).await?;
    let tls_fingerprint = match &tls_fact {
        TlsFact::Certificate { info, .. } => info.fingerprint.clone(),
        TlsFact::Unusable { .. } => String::new(),
    };
    let database_credentials = match &v.database {
        Some(db) => Some(
            secret_has_keys(
                ctx,
                &v.namespace,
                &db.credentials_secret,
                "spec.database.credentialsSecret",
                &["username", "password"],
            )
            .await?,
        ),
        None => None,
    };
    let database_ca = match v.database.as_ref().and_then(|db| db.ca_secret.as_ref()) {
        Some(ca) => Some(secret_has_keys(ctx, &v.namespace, ca, "spec.database.caSecret", &[CA_KEY]).await?),
        None => None,
    };

    let audit_key = match &v.audit {
        Some(_) => match audit_check::signing_key(ctx.applier.client(), &v.namespace, &v.name).await {
            Ok(key) => Some(key),
            Err(message) => {
                let blocked = Blocked { reason: reasons::AUDIT_KEY_UNUSABLE, message };
                return block(&v, ctx, blocked, now).await;
            }
        },
        None => None,
    };
    let (jwks, token_issuers, jwks_recheck) = match &v.auth {
        Some(auth) => jwks::issuer_keys(auth, ctx.applier.client(), &v.namespace, &v.name, &ctx.jwks, now).await,
        None => (Vec::new(), Vec::new(), None),
    };

    // Build, apply.
    let inputs = Inputs {
        tier,
        keys,
        tls_secret,
        tls_fingerprint,
        capabilities,
        images: ctx.images.clone(),
        jwks,
        audit_public_key: audit_key.as_ref().map(|k| k.pem.clone()),
        key_hints: ctx.key_hints.clone(),
    };
    let children = match build::build(&v, owner, &inputs) {
        Ok(children) => children,
        // Only a tier's limits can be inexpressible (the endpoint's own
        // fields are validated): name the reference.
        Err(e) => {
            let field = if ep.spec.rate_limit.is_some() { "spec.rateLimit.tier" } else { "spec" };
            return refuse(ep, ctx, InvalidSpec { field: field.into(), message: e.to_string() }, now).await;
        }
    };
    let applied = apply(ep, &v, ctx, children, &mut written).await?;

    // Status.
    let (backup, backup_recheck) = backup_fact(&v, &ctx.caches.backups, now);
    let (audit_fact, audit_status, audit_recheck) = match (&v.audit, &audit_key) {
        (Some(audit), Some(key)) => {
            let source = audit_check::JobSource { owner: &owner_ref(ep), image: &ctx.images.metrics };
            let (checked, next) =
                ctx.audit_checks.check(ctx.applier.client(), &v.namespace, &v.name, audit, key, &source, now).await;
            let status = audit_status(audit, key, &checked);
            let fact = compliance::AuditFact {
                destination: audit.describe(),
                key_secret: super::audit::signing_key_secret(&v.name),
                key_id: key.key_id.clone(),
                seal_every: audit.seal_every,
                verified_at: checked.at,
                verification: checked.verification,
            };
            (Some(fact), Some(status), Some(next))
        }
        _ => (None, None, None),
    };
    let facts = Facts {
        now,
        tls: tls_fact,
        network_policy: Some(applied.network_policy.clone()),
        gateway_config: build::gateway_config_name(&v.name),
        key_schedules: key_facts,
        backup: backup.clone(),
        database_credentials,
        deployment: applied.deployment.name_any(),
        database: applied.database.clone(),
        database_ca,
        access: applied.access.clone(),
        audit: audit_fact,
    };
    let compliance = compliance::evaluate(&v, &facts);
    let mut status = ep.status.clone().unwrap_or_default();
    let generation = ep.metadata.generation;
    status.observed_generation = generation;
    status.url = Some(network::url(&v.name, &v.namespace));
    let deployment = applied.deployment.status.clone().unwrap_or_default();
    status.replicas = Some(deployment.replicas.unwrap_or(0));
    status.ready_replicas = Some(deployment.ready_replicas.unwrap_or(0));
    status.key_versions = key_versions;
    status.token_issuers = token_issuers;
    status.audit = audit_status;
    status.compliance_summary = Some(compliance::summary(&compliance));
    status.compliance = compliance;

    let wanted = ep.spec.server.replicas;
    let rolled_out = pod::rollout_complete(&applied.deployment, wanted);
    let missing_key_schedule = facts.key_schedules.iter().find(|k| !k.found).map(|k| k.name.clone());
    let ready = match (&facts.tls, &missing_key_schedule) {
        (TlsFact::Unusable { reason, .. }, _) => {
            Desired::new(condition::READY, false, reasons::TLS_SECRET_UNUSABLE, reason.clone())
        }
        (_, Some(name)) => Desired::new(
            condition::READY,
            false,
            reasons::KEY_SCHEDULE_NOT_FOUND,
            format!("KeyRotationSchedule {name:?} (spec.auth.apiKeys) does not exist"),
        ),
        _ if rolled_out => {
            Desired::new(condition::READY, true, reasons::AVAILABLE, format!("{wanted} of {wanted} replicas ready"))
        }
        _ => Desired::new(
            condition::READY,
            false,
            reasons::ROLLING_OUT,
            format!("{} of {wanted} replicas ready", deployment.ready_replicas.unwrap_or(0)),
        ),
    };
    conditions::set(&mut status.conditions, ready, generation, now);
    let progressing = if rolled_out {
        Desired::new(condition::PROGRESSING, false, reasons::AVAILABLE, "rollout complete")
    } else {
        Desired::new(condition::PROGRESSING, true, reasons::ROLLING_OUT, "waiting for the Deployment's replicas")
    };
    conditions::set(&mut status.conditions, progressing, generation, now);
    let degraded = degraded(&v, &facts, capabilities);
    conditions::set(&mut status.conditions, degraded, generation, now);
    write_status(ep, ctx, status).await?;

    Ok(match [renew_at, key_recheck, backup_recheck, jwks_recheck, audit_recheck].into_iter().flatten().min() {
        Some(at) => Action::requeue(until(now, at)),
        None => Action::await_change(),
    })
}

/// `status.audit` from the last verification.
fn audit_status(
    audit: &super::audit::Audit,
    key: &audit_check::PublicKey,
    checked: &audit_check::Checked,
) -> crate::api::AuditStatus {
    use audit_check::Verification;
    let mut status = crate::api::AuditStatus {
        public_key: key.base64.clone(),
        key_id: key.key_id.clone(),
        destination: audit.describe(),
        verified_at: Some(checked.at.to_string()),
        ..Default::default()
    };
    match &checked.verification {
        // Nothing verified yet: no time, no counts.
        Verification::Pending(_) => status.verified_at = None,
        Verification::NotVerifiable(why) | Verification::Unreadable(why) => status.problem = why.clone(),
        Verification::Verified { last_seal, records, problem, .. } => {
            status.last_checkpoint = last_seal.map(|t| t.to_string());
            status.records = *records;
            status.problem = problem.clone().unwrap_or_default();
        }
    }
    status
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let wait = at.duration_since(now).as_secs().max(1) as u64;
    // Requeue at least daily: long timers drift, and the answer is cheap.
    Duration::from_secs(wait.min(24 * 3600))
}

fn degraded(v: &Validated<'_>, facts: &Facts, caps: Capabilities) -> Desired<'static> {
    let spec = &v.endpoint.spec;
    // The database connection as applied: what the tls entry says, said
    // again where a dashboard looks first.
    if let Some(applied) = &facts.database {
        let verify = matches!(applied.target.ssl_mode.as_str(), "verify-full" | "verify-ca");
        if !applied.tls_capable && spec.database.as_ref().is_some_and(|d| d.ssl_mode != SslMode::Disable) {
            return Desired::new(
                condition::DEGRADED,
                true,
                compliance::reasons::DATABASE_TLS_UNSUPPORTED,
                "flavor helios (hfs 0.2.7) connects to PostgreSQL without TLS: spec.database.sslMode is not honoured",
            );
        }
        if verify && applied.ca.is_none() {
            return Desired::new(
                condition::DEGRADED,
                true,
                compliance::reasons::DATABASE_CA_MISSING,
                "spec.database.sslMode verifies the server but no CA is given: the FHIR server cannot connect. \
                 Set spec.database.caSecret to a Secret with key ca.crt",
            );
        }
        if let Some(Err(reason)) = &facts.database_ca {
            return Desired::new(condition::DEGRADED, true, compliance::reasons::DATABASE_CA_UNUSABLE, reason.clone());
        }
    }
    if spec.monitoring.enabled && !caps.monitoring {
        return Desired::new(
            condition::DEGRADED,
            true,
            reasons::MONITORING_NOT_SERVED,
            "monitoring.coreos.com/v1 is not served: no ServiceMonitor or PrometheusRule \
             (install prometheus-operator, or set spec.monitoring.enabled: false)",
        );
    }
    if spec.server.replicas > 1 && caps.pdb == PdbApi::NotServed {
        return Desired::new(
            condition::DEGRADED,
            true,
            reasons::PDB_NOT_SERVED,
            "no PodDisruptionBudget API is served: voluntary disruptions are not limited",
        );
    }
    Desired::new(condition::DEGRADED, false, reasons::AS_EXPECTED, "every optional API the endpoint uses is served")
}

/// Records an invalid spec: Ready=False with the field, an event, nothing applied.
async fn refuse(ep: &FhirEndpoint, ctx: &Context, invalid: InvalidSpec, now: Timestamp) -> Result<Action, Error> {
    ctx.metrics.invalid_specs.get_or_create(&crate::metrics::ControllerLabels { controller: CONTROLLER }).inc();
    let mut status = ep.status.clone().unwrap_or_default();
    let generation = ep.metadata.generation;
    status.observed_generation = generation;
    let message = invalid.to_string();
    let changed = !status.conditions.iter().any(|c| c.type_ == condition::READY && c.message == message);
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::READY, false, reason::INVALID_SPEC, message.clone()),
        generation,
        now,
    );
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::PROGRESSING, false, reason::INVALID_SPEC, "waiting for a valid spec"),
        generation,
        now,
    );
    if changed {
        publish(ctx, ep, EventType::Warning, reason::INVALID_SPEC, message).await;
    }
    write_status(ep, ctx, status).await?;
    Ok(Action::await_change())
}

/// Records a missing dependency: Ready=False, Degraded=True, nothing changed.
async fn block(v: &Validated<'_>, ctx: &Context, blocked: Blocked, now: Timestamp) -> Result<Action, Error> {
    let ep = v.endpoint;
    let mut status = ep.status.clone().unwrap_or_default();
    let generation = ep.metadata.generation;
    status.observed_generation = generation;
    let changed = !status.conditions.iter().any(|c| c.type_ == condition::READY && c.reason == blocked.reason);
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::READY, false, blocked.reason, blocked.message.clone()),
        generation,
        now,
    );
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::DEGRADED, true, blocked.reason, blocked.message.clone()),
        generation,
        now,
    );
    if changed {
        publish(ctx, ep, EventType::Warning, blocked.reason, blocked.message).await;
    }
    write_status(ep, ctx, status).await?;
    // The missing object's watch triggers the next reconcile.
    Ok(Action::await_change())
}

/// How long after its next rotation was due a key schedule counts as
/// overdue: a rotation waits for every consumer's rollout first.
pub const ROTATION_SLACK: SignedDuration = SignedDuration::from_mins(30);

/// What the endpoint's key schedules give it.
struct KeyLookups {
    sources: Vec<KeySource>,
    facts: Vec<KeyScheduleFact>,
    versions: Vec<KeyVersionsInForce>,
    /// When a schedule would become overdue, to look again then.
    recheck: Option<Timestamp>,
}

fn key_sources(
    v: &Validated<'_>,
    schedules: &Store<KeyRotationSchedule>,
    now: Timestamp,
) -> Result<KeyLookups, InvalidSpec> {
    let mut sources = Vec::new();
    let mut facts = Vec::new();
    let mut versions = Vec::new();
    let mut recheck = None;
    for (i, name) in v.endpoint.spec.auth.api_keys.iter().enumerate() {
        let Some(krs) = schedules.get(&ObjectRef::new(name).within(&v.namespace)) else {
            facts.push(KeyScheduleFact {
                name: name.clone(),
                found: false,
                suspended: false,
                rotating: None,
                overdue_since: None,
            });
            continue;
        };
        if krs.spec.algorithm != KeyAlgorithm::ApiKey {
            return Err(InvalidSpec {
                field: format!("spec.auth.apiKeys[{i}]"),
                message: format!(
                    "KeyRotationSchedule {name:?} has algorithm {:?}; the gateway needs api-key",
                    krs.spec.algorithm
                ),
            });
        }
        let status = krs.status.clone().unwrap_or_default();
        let accepted = rotation::accepted(&status);
        let fingerprint = rotation::fingerprint(&status);
        sources.push(KeySource {
            schedule: name.clone(),
            secret_name: keyrotation::secret::secret_name(&krs),
            versions_fingerprint: fingerprint.clone(),
        });
        let ready = status.conditions.iter().find(|c| c.type_ == condition::READY).map(|c| c.status == "True");
        let overdue_since = status
            .next_rotation_time
            .as_ref()
            .map(|t| t.0)
            .filter(|due| !krs.spec.suspend && now > due.checked_add(ROTATION_SLACK).unwrap_or(Timestamp::MAX));
        facts.push(KeyScheduleFact {
            name: name.clone(),
            found: true,
            suspended: krs.spec.suspend,
            rotating: ready,
            overdue_since,
        });
        if let Some(due) = status.next_rotation_time.as_ref().map(|t| t.0) {
            let check = due.checked_add(ROTATION_SLACK).unwrap_or(Timestamp::MAX);
            if check > now {
                recheck = Some(recheck.map_or(check, |r: Timestamp| r.min(check)));
            }
        }
        if !accepted.is_empty() {
            versions.push(KeyVersionsInForce { schedule: name.clone(), versions: accepted, fingerprint });
        }
    }
    Ok(KeyLookups { sources, facts, versions, recheck })
}

/// The endpoint's backup record, and when it next goes stale.
fn backup_fact(v: &Validated<'_>, backups: &Store<BackupPolicy>, now: Timestamp) -> (BackupFact, Option<Timestamp>) {
    let mut policies: Vec<Arc<BackupPolicy>> = backups
        .state()
        .into_iter()
        .filter(|b| b.namespace().as_deref() == Some(v.namespace.as_str()) && b.spec.endpoint == v.name)
        .collect();
    policies.sort_by_key(|b| b.name_any());
    let Some(policy) = policies.first() else { return (BackupFact::NoPolicy, None) };
    let status = policy.status.clone().unwrap_or_default();
    let Ok(settings) = crate::backup::plan::settings(&policy.spec) else {
        let fact = BackupFact::Policy {
            name: policy.name_any(),
            last_success: None,
            current: Some(false),
            restore_verified: false,
        };
        return (fact, None);
    };
    let (backup_max, drill_max) = crate::backup::plan::freshness(&settings, now);
    let last_success = status.last_successful_backup.as_ref().map(|b| b.completion_time.as_ref().unwrap_or(&b.time).0);
    let last_finished = status.history.iter().find(|r| r.outcome != BackupOutcome::Running);
    let current = match last_success {
        Some(t) => Some(now.duration_since(t) <= backup_max),
        None if last_finished.is_some() => Some(false),
        None => None,
    };
    let restored = status.last_verified_restore.as_ref().map(|r| r.time.0);
    let restore_verified = match (restored, drill_max) {
        (Some(t), Some(max)) => now.duration_since(t) <= max,
        _ => false,
    };
    let stale_at = |t: Option<Timestamp>, max: Option<SignedDuration>| t?.checked_add(max?).ok().filter(|at| *at > now);
    let recheck = [stale_at(last_success, Some(backup_max)), stale_at(restored, drill_max)].into_iter().flatten().min();
    (BackupFact::Policy { name: policy.name_any(), last_success, current, restore_verified }, recheck)
}

/// The gateway's certificate: the user's Secret, or one the operator
/// issues and renews. Returns the Secret's name, what it holds, and when
/// to look again.
async fn certificate(
    v: &Validated<'_>,
    ctx: &Context,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    now: Timestamp,
    written: &mut Vec<String>,
) -> Result<(String, TlsFact, Option<Timestamp>), Error> {
    if let Some(user) = &v.endpoint.spec.tls {
        let api: Api<Secret> = Api::namespaced(ctx.applier.client().clone(), &v.namespace);
        let secret = api
            .get_opt(&user.secret_name)
            .await
            .map_err(|source| Error::Dereference { what: format!("Secret {}", user.secret_name), source })?;
        let fact = match secret.as_ref().map(tls::inspect) {
            Some(Ok(info)) => TlsFact::Certificate { secret: user.secret_name.clone(), info },
            Some(Err(e)) => TlsFact::Unusable { secret: user.secret_name.clone(), reason: e.to_string() },
            None => TlsFact::Unusable {
                secret: user.secret_name.clone(),
                reason: format!("Secret {:?} (spec.tls.secretName) does not exist", user.secret_name),
            },
        };
        let recheck = match &fact {
            TlsFact::Certificate { info, .. } => Some(info.not_after.min(now + SignedDuration::from_hours(24))),
            TlsFact::Unusable { .. } => None,
        };
        return Ok((user.secret_name.clone(), fact, recheck));
    }
    let name = build::self_issued_tls_name(&v.name);
    let names = tls::dns_names(&v.name, &v.namespace);
    let cached = ctx.caches.secrets.get(&ObjectRef::new(&name).within(&v.namespace));
    let current = cached.as_deref().and_then(|s| tls::inspect(s).ok());
    let info = if tls::needs_issuing(current.as_ref(), &names, now) {
        let (cert, key) = tls::issue(&names, now)?;
        let meta = child_meta(name.clone(), &v.namespace, &build::labels(&v.name), owner.clone());
        let applied = ctx
            .applier
            .ensure(&ctx.caches.secrets, tls::secret(meta, cert, key))
            .await
            .map_err(|source| Error::Apply { kind: "Secret".into(), name: name.clone(), source })?;
        let info = tls::inspect(&applied.into_object())?;
        info!(secret = %name, not_after = %info.not_after, "issued the gateway certificate");
        let what = if current.is_some() { "renewed" } else { "created" };
        written.push(format!("Secret {name} ({what}: self-signed certificate valid until {})", info.not_after));
        info
    } else {
        current.ok_or_else(|| tls::TlsError::MissingCertificate(name.clone()))?
    };
    let renew = tls::renewal_due(&info);
    Ok((name.clone(), TlsFact::Certificate { secret: name, info }, Some(renew)))
}

/// Whether Secret `name` exists with every one of `keys` (Err says what is
/// wrong, naming `field`). Only key names are looked at; values are never
/// read into a message.
async fn secret_has_keys(
    ctx: &Context,
    namespace: &str,
    name: &str,
    field: &str,
    keys: &[&str],
) -> Result<Result<(), String>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.applier.client().clone(), namespace);
    let secret =
        api.get_opt(name).await.map_err(|source| Error::Dereference { what: format!("Secret {name}"), source })?;
    Ok(match secret {
        None => Err(format!("Secret {name:?} ({field}) does not exist")),
        Some(s) => {
            let has = |k: &str| {
                s.data.as_ref().is_some_and(|d| d.contains_key(k))
                    || s.string_data.as_ref().is_some_and(|d| d.contains_key(k))
            };
            match keys.iter().find(|k| !has(k)) {
                Some(missing) => Err(format!("Secret {name:?} ({field}) has no key {missing:?}")),
                None => Ok(()),
            }
        }
    })
}

/// What `apply` leaves for the status step.
struct AppliedChildren {
    deployment: Deployment,
    network_policy: String,
    /// The FHIR server's database connection in the applied Deployment.
    database: Option<database::Applied>,
    /// Client scopes as the applied ConfigMap and Deployment enforce them.
    access: Option<compliance::AccessFact>,
}

async fn ensure<K: ChildKind>(
    ctx: &Context,
    ep: &FhirEndpoint,
    cache: &Store<K>,
    desired: K,
    written: &mut Vec<String>,
) -> Result<K, Error> {
    let name = desired.name_any();
    let kind = K::kind(&()).into_owned();
    let applied = ctx.applier.ensure(cache, desired).await.map_err(|source| Error::Apply {
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    if let Some(why) = applied.written() {
        ctx.metrics
            .writes
            .get_or_create(&WriteLabels { controller: CONTROLLER, kind: kind.clone(), reason: why.label() })
            .inc();
        if why == WriteReason::Drifted {
            publish(
                ctx,
                ep,
                EventType::Normal,
                reasons::DRIFT_CORRECTED,
                format!("{kind} {name} was changed by someone else; put back"),
            )
            .await;
        }
        if matches!(why, WriteReason::Missing | WriteReason::Changed) {
            written.push(format!("{kind} {name}{}", if why == WriteReason::Missing { " (created)" } else { "" }));
        }
    }
    Ok(applied.into_object())
}

async fn remove<K: ChildKind>(ctx: &Context, cache: Option<&Store<K>>, ns: &str, name: &str) -> Result<(), Error> {
    if let Some(cache) = cache {
        ctx.applier.remove(cache, ns, name).await.map_err(|source| Error::Remove {
            kind: K::kind(&()).into_owned(),
            name: name.into(),
            source,
        })?;
    }
    Ok(())
}

async fn apply(
    ep: &FhirEndpoint,
    v: &Validated<'_>,
    ctx: &Context,
    children: Children,
    written: &mut Vec<String>,
) -> Result<AppliedChildren, Error> {
    // No `..`: a child kind added to Children must be applied here.
    let Children {
        service_account,
        gateway_config,
        deployment,
        service,
        network_policy,
        disruption_budget,
        service_monitor,
        prometheus_rule,
    } = children;
    let c = &ctx.caches;
    ensure(ctx, ep, &c.service_accounts, service_account, written).await?;
    // Read from the objects sent, as the database below.
    let applied_auth = gateway_config
        .data
        .as_ref()
        .and_then(|d| d.get(auth::AUTH_CONFIG_KEY))
        .and_then(|json| serde_json::from_str::<crate::gateway_auth::AuthConfig>(json).ok());
    let verifier_deployed = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|p| p.containers.iter().any(|c| c.name == pod::AUTH_CONTAINER));
    let access = applied_auth.map(|config| compliance::AccessFact {
        clients: config.clients.map(|c| c.into_iter().collect()),
        verifier_deployed,
    });
    ensure(ctx, ep, &c.config_maps, gateway_config, written).await?;
    let np_name = network_policy.name_any();
    ensure(ctx, ep, &c.network_policies, network_policy, written).await?;
    ensure(ctx, ep, &c.services, service, written).await?;
    // Read from the object sent: once `ensure` returns, the API server holds
    // exactly it (written now, or found carrying its hash and unchanged since
    // the operator's last write). The cache keeps no Deployment spec to read.
    let database = database::applied(&deployment);
    let deployment = ensure(ctx, ep, &c.deployments, deployment, written).await?;

    let (ns, name) = (v.namespace.as_str(), v.name.as_str());
    match (disruption_budget, &c.pdbs, &c.pdbs_v1beta1) {
        (Some(pdb), Some(cache), _) => drop(ensure(ctx, ep, cache, pdb, written).await?),
        (Some(pdb), None, Some(cache)) => {
            drop(ensure(ctx, ep, cache, PodDisruptionBudgetV1beta1::from(pdb), written).await?)
        }
        (Some(_), None, None) => {}
        (None, v1, v1beta1) => {
            remove(ctx, v1.as_ref(), ns, name).await?;
            remove(ctx, v1beta1.as_ref(), ns, name).await?;
        }
    }
    match (service_monitor, &c.service_monitors) {
        (Some(sm), Some(cache)) => drop(ensure(ctx, ep, cache, sm, written).await?),
        (None, cache) => remove(ctx, cache.as_ref(), ns, name).await?,
        (Some(_), None) => {}
    }
    match (prometheus_rule, &c.prometheus_rules) {
        (Some(pr), Some(cache)) => drop(ensure(ctx, ep, cache, pr, written).await?),
        (None, cache) => remove(ctx, cache.as_ref(), ns, name).await?,
        (Some(_), None) => {}
    }
    if !written.is_empty() {
        let created = written.iter().all(|w| w.contains("(created"));
        let reason = if created { reasons::CREATED } else { reasons::UPDATED };
        publish(ctx, ep, EventType::Normal, reason, written.join(", ")).await;
    }
    Ok(AppliedChildren { deployment, network_policy: np_name, database, access })
}

/// Writes the status if it differs from what the API server holds.
async fn write_status(ep: &FhirEndpoint, ctx: &Context, status: FhirEndpointStatus) -> Result<(), Error> {
    if ep.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<FhirEndpoint> = Api::namespaced(ctx.applier.client().clone(), &ep.namespace().unwrap_or_default());
    apply_status(&api, &ep.name_any(), &status, FIELD_MANAGER).await.map_err(Error::Status)
}

/// Publishes an event; a failure to record it is logged, not fatal.
async fn publish(ctx: &Context, ep: &FhirEndpoint, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    publish_event(&ctx.recorder, ep, event).await;
}
