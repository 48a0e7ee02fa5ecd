//! The KeyRotationSchedule controller: reads the schedule, its Secret and
//! its consumers, asks [`rotation::plan`] what to do, writes the Secret (and
//! the JWKS ConfigMap), then the status, then one event per step.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::{info, instrument, warn};

use super::keys::{self, KeyError};
use super::rotation::{self, Observed, ROTATE_ANNOTATION};
use super::secret::{jwks_name, secret_name};
use super::{schedule, secret};
use crate::api::{
    BackupPolicy, FhirEndpoint, KeyAlgorithm, KeyRotationSchedule, KeyRotationScheduleStatus, KeyVersionState,
    ObjectRef as StatusRef, RotationPhase, condition, reason,
};
use crate::apply::{Applier, ChildKind, NoSharedBackoff, api, apply_status, drive, publish_event};
use crate::caches::Caches;
use crate::conditions::{self, Clock, Desired};
use crate::fhirendpoint::validate::InvalidSpec;
use crate::health::Watches;
use crate::meta::{MANAGED_BY, MANAGED_BY_LABEL, child_meta, owner_ref};
use crate::metrics::{SharedMetrics, StepLabels, WriteLabels};

pub const FIELD_MANAGER: &str = "fhir-operator/keyrotationschedule";
pub const CONTROLLER: &str = "keyrotationschedule";
/// Label naming the schedule on its Secret and JWKS ConfigMap.
pub const SCHEDULE_LABEL: &str = "fhiroperator.io/key-schedule";
/// Key of the JWKS document in its ConfigMap (`ecdsa-p256`).
pub const JWKS_KEY: &str = "jwks.json";

/// Reasons of this controller's conditions.
pub mod reasons {
    pub const KEYS_ISSUED: &str = "KeysIssued";
    pub const SUSPENDED: &str = "Suspended";
    pub const SECRET_NOT_OWNED: &str = "SecretNotOwned";
    pub const IDLE: &str = "Idle";
    pub const WAITING_FOR_CONSUMERS: &str = "WaitingForConsumers";
    pub const GRACE_PERIOD: &str = "GracePeriod";
}

/// Shared by every reconcile of one scope.
pub struct Context {
    pub applier: Applier,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub endpoints: Store<FhirEndpoint>,
    pub backups: Store<BackupPolicy>,
    pub clock: Arc<dyn Clock>,
    pub metrics: SharedMetrics,
    pub recorder: Recorder,
}

/// Error messages name objects and entries, never a key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {name}: {source}")]
    ReadSecret { name: String, source: kube::Error },
    #[error("applying {kind} {name}: {source}")]
    Apply { kind: String, name: String, source: kube::Error },
    #[error("writing status: {0}")]
    Status(kube::Error),
    #[error(transparent)]
    Keys(#[from] KeyError),
}

impl Error {
    fn category(&self) -> &'static str {
        match self {
            Error::ReadSecret { .. } => "dereference",
            Error::Apply { .. } => "apply",
            Error::Status(_) => "status",
            Error::Keys(_) => "keys",
        }
    }
}

fn error_policy(krs: Arc<KeyRotationSchedule>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, error.category());
    warn!(namespace = krs.namespace().unwrap_or_default(), name = krs.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[instrument(skip_all, fields(kind = "KeyRotationSchedule", namespace = %krs.namespace().unwrap_or_default(), name = %krs.name_any(), generation = krs.metadata.generation.unwrap_or_default()))]
async fn reconcile(krs: Arc<KeyRotationSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = run(&krs, &ctx).await;
    ctx.metrics.observe(CONTROLLER, started.elapsed());
    result
}

async fn run(krs: &KeyRotationSchedule, ctx: &Context) -> Result<Action, Error> {
    let now = ctx.clock.now();
    let name = krs.name_any();
    let ns = krs.namespace().unwrap_or_default();
    let consumers = consumers(krs, ctx);
    let settings = match rotation::settings(&krs.spec) {
        Ok(settings) => settings,
        Err(invalid) => return refuse(krs, ctx, consumers, invalid, now).await,
    };

    let secret_name = secret_name(krs);
    let live = Api::<Secret>::namespaced(ctx.applier.client().clone(), &ns)
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::ReadSecret { name: secret_name.clone(), source })?;
    if let Some(foreign) =
        live.as_ref().filter(|s| !s.owner_references().iter().any(|o| Some(&o.uid) == krs.uid().as_ref()))
    {
        let message = format!(
            "Secret {:?} (spec.secretName) exists and is not owned by this KeyRotationSchedule; \
             the operator never overwrites a Secret it did not create",
            foreign.name_any()
        );
        return refuse_with(krs, ctx, consumers, reasons::SECRET_NOT_OWNED, message, now).await;
    }
    let live = live.and_then(|s| s.data).unwrap_or_default();

    let status = krs.status.clone().unwrap_or_default();
    let in_secret = keys::versions(&live);
    let clients_changed = krs.spec.algorithm == KeyAlgorithm::ApiKey
        && status.current_version.is_some_and(|current| {
            in_secret.contains(&current)
                && keys::clients_of(&live, current) != krs.spec.clients.iter().cloned().collect::<BTreeSet<_>>()
        });
    let waiting = waiting_consumers(krs, ctx, &rotation::fingerprint(&status));
    let observed = Observed {
        status: &status,
        in_secret: &in_secret,
        clients_changed,
        rotate_request: krs.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        consumers_rolled: waiting.is_empty(),
        now,
    };
    let plan = rotation::plan(&settings, &observed);

    // The Secret first: a status never records what the Secret lacks.
    let composed = secret::compose(&name, krs.spec.algorithm, &krs.spec.clients, &live, &plan)?;
    let owner = owner_ref(krs);
    let labels = [
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "fhir-operator".to_owned()),
        (SCHEDULE_LABEL.to_owned(), name.clone()),
    ]
    .into();
    let secret = Secret {
        metadata: child_meta(secret_name, &ns, &labels, owner.clone()),
        data: Some(composed.data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    ensure(ctx, &ctx.secrets, secret).await?;
    if let Some(jwks) = composed.jwks {
        let config_map = ConfigMap {
            metadata: child_meta(jwks_name(&name), &ns, &labels, owner),
            data: Some([(JWKS_KEY.to_owned(), jwks)].into()),
            ..Default::default()
        };
        ensure(ctx, &ctx.config_maps, config_map).await?;
    }

    // Then the status.
    let mut next = plan.status.clone();
    next.observed_generation = krs.metadata.generation;
    next.consumers = consumers;
    next.conditions = status.conditions.clone();
    let still_waiting = waiting_consumers(krs, ctx, &rotation::fingerprint(&next));
    for desired in desired_conditions(&settings, &next, &still_waiting) {
        conditions::set(&mut next.conditions, desired, krs.metadata.generation, now);
    }
    write_status(krs, ctx, next).await?;

    for step in &plan.steps {
        let type_ = if step.is_warning() { EventType::Warning } else { EventType::Normal };
        info!(step = step.reason(), "{step}");
        ctx.metrics.steps.get_or_create(&StepLabels { step: step.reason() }).inc();
        publish(ctx, krs, type_, step.reason(), step.to_string()).await;
    }
    Ok(match plan.wake_at {
        Some(at) => Action::requeue(ctx.clock.real_wait(schedule::wait_until(now, at))),
        None => Action::await_change(),
    })
}

/// The conditions for a status `next`, with `waiting` the consumers that
/// do not accept its key set yet.
fn desired_conditions(
    settings: &rotation::Settings,
    next: &KeyRotationScheduleStatus,
    waiting: &[String],
) -> [Desired<'static>; 2] {
    let current = next.current_version.unwrap_or_default();
    let ready = if settings.suspend {
        Desired::new(
            condition::READY,
            true,
            reasons::SUSPENDED,
            format!("rotation suspended (spec.suspend); key version {current} stays current"),
        )
    } else {
        Desired::new(condition::READY, true, reasons::KEYS_ISSUED, format!("key version {current} is current"))
    };
    let progressing = match next.rotation.as_ref() {
        None => Desired::new(condition::PROGRESSING, false, reasons::IDLE, "no rotation under way"),
        Some(r) if r.phase == RotationPhase::ConsumersRolled => {
            let previous: Vec<String> = next
                .versions
                .iter()
                .filter(|v| v.state == KeyVersionState::Previous)
                .map(|v| match &v.expires_at {
                    Some(t) => format!("{} until {}", v.version, t.0),
                    None => v.version.to_string(),
                })
                .collect();
            Desired::new(
                condition::PROGRESSING,
                true,
                reasons::GRACE_PERIOD,
                format!("key version {current} is current; still accepted: {}", previous.join(", ")),
            )
        }
        Some(r) => {
            let what = if r.phase == RotationPhase::Created {
                format!("key version {} created", r.target_version)
            } else {
                "previous key versions retired".to_owned()
            };
            let message = if waiting.is_empty() {
                format!("{what}; every consumer accepts the new key set")
            } else {
                format!("{what}; waiting for consumers to accept the new key set: {}", waiting.join(", "))
            };
            Desired::new(condition::PROGRESSING, true, reasons::WAITING_FOR_CONSUMERS, message)
        }
    };
    [ready, progressing]
}

/// The endpoints and backup policies in the schedule's namespace that use it.
fn consumers(krs: &KeyRotationSchedule, ctx: &Context) -> Vec<StatusRef> {
    let (name, ns) = (krs.name_any(), krs.namespace().unwrap_or_default());
    let in_ns = |other: Option<String>| other.as_deref() == Some(ns.as_str());
    let mut found: Vec<StatusRef> = ctx
        .endpoints
        .state()
        .iter()
        .filter(|ep| in_ns(ep.namespace()) && ep.spec.auth.api_keys.contains(&name))
        .map(|ep| StatusRef { kind: "FhirEndpoint".into(), namespace: ns.clone(), name: ep.name_any() })
        .chain(
            ctx.backups
                .state()
                .iter()
                .filter(|b| in_ns(b.namespace()) && b.spec.encryption.key_schedule == name)
                .map(|b| StatusRef { kind: "BackupPolicy".into(), namespace: ns.clone(), name: b.name_any() }),
        )
        .collect();
    found.sort();
    found
}

/// Endpoints that use the schedule and have not yet rolled out the key set
/// with `fingerprint`, as `FhirEndpoint/<name>`. Backup policies read the
/// current key when a backup starts: nothing of theirs rolls.
fn waiting_consumers(krs: &KeyRotationSchedule, ctx: &Context, fingerprint: &str) -> Vec<String> {
    let (name, ns) = (krs.name_any(), krs.namespace());
    let mut waiting: Vec<String> = ctx
        .endpoints
        .state()
        .iter()
        .filter(|ep| ep.namespace() == ns && ep.spec.auth.api_keys.contains(&name))
        .filter(|ep| !endpoint_accepts(ep, &name, fingerprint))
        .map(|ep| format!("FhirEndpoint/{}", ep.name_any()))
        .collect();
    waiting.sort();
    waiting
}

/// Whether the endpoint's status says its pods accept exactly the key set
/// `fingerprint` of `schedule` and its rollout is complete.
pub fn endpoint_accepts(ep: &FhirEndpoint, schedule: &str, fingerprint: &str) -> bool {
    let Some(status) = &ep.status else { return false };
    status.observed_generation == ep.metadata.generation
        && status.key_versions.iter().any(|k| k.schedule == schedule && k.fingerprint == fingerprint)
        && status.conditions.iter().any(|c| c.type_ == condition::PROGRESSING && c.status == "False")
}

async fn ensure<K: ChildKind>(ctx: &Context, cache: &Store<K>, desired: K) -> Result<(), Error> {
    let name = desired.name_any();
    let kind = K::kind(&()).into_owned();
    let applied = ctx.applier.ensure(cache, desired).await.map_err(|source| Error::Apply {
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    if let Some(why) = applied.written() {
        ctx.metrics.writes.get_or_create(&WriteLabels { controller: CONTROLLER, kind, reason: why.label() }).inc();
    }
    Ok(())
}

/// An invalid spec: Ready=False naming the field; the Secret is left as it
/// is (keys already issued stay valid) and nothing rotates.
async fn refuse(
    krs: &KeyRotationSchedule,
    ctx: &Context,
    consumers: Vec<StatusRef>,
    invalid: InvalidSpec,
    now: Timestamp,
) -> Result<Action, Error> {
    ctx.metrics.invalid_specs.get_or_create(&crate::metrics::ControllerLabels { controller: CONTROLLER }).inc();
    refuse_with(krs, ctx, consumers, reason::INVALID_SPEC, invalid.to_string(), now).await
}

async fn refuse_with(
    krs: &KeyRotationSchedule,
    ctx: &Context,
    consumers: Vec<StatusRef>,
    why: &'static str,
    message: String,
    now: Timestamp,
) -> Result<Action, Error> {
    let mut status = krs.status.clone().unwrap_or_default();
    let generation = krs.metadata.generation;
    status.observed_generation = generation;
    status.consumers = consumers;
    let changed = !status.conditions.iter().any(|c| c.type_ == condition::READY && c.message == message);
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::READY, false, why, message.clone()),
        generation,
        now,
    );
    conditions::set(
        &mut status.conditions,
        Desired::new(condition::PROGRESSING, false, why, "nothing rotates until this is fixed"),
        generation,
        now,
    );
    write_status(krs, ctx, status).await?;
    if changed {
        publish(ctx, krs, EventType::Warning, why, message).await;
    }
    Ok(Action::await_change())
}

async fn write_status(
    krs: &KeyRotationSchedule,
    ctx: &Context,
    status: KeyRotationScheduleStatus,
) -> Result<(), Error> {
    if krs.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<KeyRotationSchedule> =
        Api::namespaced(ctx.applier.client().clone(), &krs.namespace().unwrap_or_default());
    apply_status(&api, &krs.name_any(), &status, FIELD_MANAGER).await.map_err(Error::Status)
}

async fn publish(ctx: &Context, krs: &KeyRotationSchedule, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Rotate".into(), secondary: None };
    publish_event(&ctx.recorder, krs, event).await;
}

/// Sets up the controller of one scope (`None`: all namespaces),
/// subscribing to `caches`; the future runs it until `shutdown` completes,
/// and calls `ready` once its caches are filled.
#[allow(clippy::too_many_arguments)]
pub fn run_scope(
    client: Client,
    clock: Arc<dyn Clock>,
    metrics: SharedMetrics,
    watches: Watches,
    namespace: Option<String>,
    instance: Option<String>,
    caches: &Caches,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let ns = namespace.as_deref();
    let w = watches.controller(CONTROLLER, ns);
    let (secrets, secret_stream) = caches.children(api::<Secret>(&client, ns), &w);
    let (config_maps, cm_stream) = caches.children(api::<ConfigMap>(&client, ns), &w);
    let (endpoints, endpoint_stream) = caches.related(api::<FhirEndpoint>(&client, ns), &w);
    let (backups, backup_stream) = caches.related(api::<BackupPolicy>(&client, ns), &w);
    let (schedules, schedule_stream) = caches.related(api::<KeyRotationSchedule>(&client, ns), &w);
    let controller = Controller::for_shared_stream(schedule_stream, schedules.clone())
        .trigger_backoff(NoSharedBackoff)
        .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)))
        .owns_shared_stream(secret_stream)
        .owns_shared_stream(cm_stream)
        .watches_shared_stream(endpoint_stream, |ep: Arc<FhirEndpoint>| {
            let ns = ep.namespace().unwrap_or_default();
            ep.spec.auth.api_keys.iter().map(|name| ObjectRef::new(name).within(&ns)).collect::<Vec<_>>()
        })
        .watches_shared_stream(backup_stream, |policy: Arc<BackupPolicy>| {
            let ns = policy.namespace().unwrap_or_default();
            [ObjectRef::new(&policy.spec.encryption.key_schedule).within(&ns)]
        })
        .graceful_shutdown_on(shutdown);
    let reporter = Reporter { controller: "fhir-operator".into(), instance };
    let context = Arc::new(Context {
        applier: Applier::new(client.clone(), FIELD_MANAGER),
        secrets: secrets.clone(),
        config_maps: config_maps.clone(),
        endpoints: endpoints.clone(),
        backups: backups.clone(),
        clock,
        metrics,
        recorder: Recorder::new(client, reporter),
    });
    let caches_filled = async move {
        let _ = futures::join!(
            secrets.wait_until_ready(),
            config_maps.wait_until_ready(),
            endpoints.wait_until_ready(),
            backups.wait_until_ready(),
            schedules.wait_until_ready(),
        );
    };
    let run = controller.run(reconcile, error_policy, context);
    async move { drive(run, caches_filled, ready, CONTROLLER, namespace.as_deref()).await }
}
