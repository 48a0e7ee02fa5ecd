//! Wires the FhirEndpoint controller. Per watched scope (all namespaces, or
//! each listed namespace) one controller with its own caches: one watch per
//! kind, filtered to what the operator manages for children, whose stream
//! both fills the cache and triggers reconciles; tiers, key schedules and
//! backup policies map to the endpoints that reference them.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Future, FutureExt, StreamExt, future};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::build::Images;
use super::monitoring::{PrometheusRule, ServiceMonitor};
use super::reconcile::{self, Caches, Context};
use crate::api::{BackupPolicy, FhirEndpoint, KeyRotationSchedule, RateLimitTier};
use crate::apply::{Applier, ChildKind, NoSharedBackoff, api, generation_version};
use crate::caches;
use crate::conditions::Clock;
use crate::discovery::{self, Capabilities, PdbApi, PodDisruptionBudgetV1beta1};
use crate::health::Watches;
use crate::metrics::SharedMetrics;

// The disruption controller writes PDB status; custom resources bump their
// generation only when what the operator set changes.
impl ChildKind for PodDisruptionBudget {
    fn observed_version(&self) -> String {
        generation_version(self)
    }
}
impl ChildKind for PodDisruptionBudgetV1beta1 {
    fn observed_version(&self) -> String {
        generation_version(self)
    }
}
impl ChildKind for ServiceMonitor {
    fn observed_version(&self) -> String {
        generation_version(self)
    }
}
impl ChildKind for PrometheusRule {
    fn observed_version(&self) -> String {
        generation_version(self)
    }
}

/// Settings of the controller.
#[derive(Clone)]
pub struct Settings {
    /// `None`: all namespaces; otherwise one controller per listed namespace.
    pub namespaces: Option<Vec<String>>,
    pub images: Images,
    /// Reconciles running at once, per scope.
    pub concurrency: u16,
    /// How often optional APIs are rediscovered (a cluster may gain the
    /// monitoring CRDs; their watches start at the next operator start).
    pub discovery_interval: Duration,
    /// The pod name, for events.
    pub instance: Option<String>,
    /// Images of backup and restore drill Jobs.
    pub backup_images: crate::backup::job::JobImages,
    /// The backup controller's clock (the system's, but in tests of fast
    /// cron schedules).
    pub backup_clock: Arc<dyn crate::conditions::Clock>,
    /// Token issuers' keys fetched from JWKS URLs, for every scope.
    pub jwks: Arc<super::jwks::JwksCache>,
    /// Where gateways report unknown signing keys; `None`: nowhere.
    pub key_hints: Option<super::auth::KeyHints>,
}

/// Shared by the controllers of every scope.
#[derive(Clone)]
pub struct Shared {
    pub client: Client,
    pub applier: Applier,
    pub clock: Arc<dyn Clock>,
    pub metrics: SharedMetrics,
    pub capabilities: Arc<RwLock<Capabilities>>,
    /// Every watch's health (`/healthz`, `/readyz`).
    pub watches: Watches,
}

/// Endpoints (in `store`) whose spec names `matches`.
fn referencing(store: &Store<FhirEndpoint>, matches: impl Fn(&FhirEndpoint) -> bool) -> Vec<ObjectRef<FhirEndpoint>> {
    store.state().iter().filter(|ep| matches(ep)).map(|ep| ObjectRef::from_obj(ep.as_ref())).collect()
}

/// Endpoints of this scope whose issuers' keys a gateway's hint fetched.
fn key_hint_reconciles(
    cache: &super::jwks::JwksCache,
    namespace: Option<String>,
) -> impl futures::Stream<Item = ObjectRef<FhirEndpoint>> + Send + 'static {
    use tokio::sync::broadcast::error::RecvError;
    futures::stream::unfold(cache.subscribe(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(endpoint) => return Some((endpoint, rx)),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |endpoint| futures::future::ready(namespace.is_none() || endpoint.namespace == namespace))
}

/// Sets up the controller of one scope, subscribing to `caches`; the
/// future runs it until `shutdown` completes.
pub fn run_scope(
    shared: Shared,
    settings: Settings,
    namespace: Option<String>,
    caches: &caches::Caches,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
    ready: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let client = shared.client.clone();
    let ns = namespace.as_deref();
    let caps = shared.capabilities.read().map(|c| *c).unwrap_or_default();

    let w = shared.watches.controller(reconcile::CONTROLLER, ns);
    let (service_accounts, sa_stream) = caches.children(api::<ServiceAccount>(&client, ns), &w);
    let (config_maps, cm_stream) = caches.children(api::<ConfigMap>(&client, ns), &w);
    let (secrets, secret_stream) = caches.children(api::<Secret>(&client, ns), &w);
    let (deployments, deploy_stream) = caches.children(api::<Deployment>(&client, ns), &w);
    let (services, svc_stream) = caches.children(api::<Service>(&client, ns), &w);
    let (network_policies, np_stream) = caches.children(api::<NetworkPolicy>(&client, ns), &w);
    let (tiers, tier_stream) = caches.related(Api::<RateLimitTier>::all(client.clone()), &w);
    let (key_schedules, krs_stream) = caches.related(api::<KeyRotationSchedule>(&client, ns), &w);
    let (backups, backup_stream) = caches.related(api::<BackupPolicy>(&client, ns), &w);

    // The endpoints themselves, cached without managedFields like every
    // other kind (two writers' field sets per endpoint add up).
    let (endpoint_cache, endpoint_stream) = caches.related(api::<FhirEndpoint>(&client, ns), &w);
    let mut controller = Controller::for_shared_stream(endpoint_stream, endpoint_cache)
        .trigger_backoff(NoSharedBackoff)
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(settings.concurrency)
                .debounce(Duration::from_millis(500)),
        )
        .owns_shared_stream(sa_stream)
        .owns_shared_stream(cm_stream)
        .owns_shared_stream(secret_stream)
        .owns_shared_stream(deploy_stream)
        .owns_shared_stream(svc_stream)
        .owns_shared_stream(np_stream);
    let endpoints = controller.store();

    let (pdbs, pdbs_v1beta1) = match caps.pdb {
        PdbApi::V1 => {
            let (store, stream) = caches.children(api::<PodDisruptionBudget>(&client, ns), &w);
            controller = controller.owns_shared_stream(stream);
            (Some(store), None)
        }
        PdbApi::V1beta1 => {
            let (store, stream) = caches.children(api::<PodDisruptionBudgetV1beta1>(&client, ns), &w);
            controller = controller.owns_shared_stream(stream);
            (None, Some(store))
        }
        PdbApi::NotServed => (None, None),
    };
    let (service_monitors, prometheus_rules) = if caps.monitoring {
        let (sm, sm_stream) = caches.children(api::<ServiceMonitor>(&client, ns), &w);
        let (pr, pr_stream) = caches.children(api::<PrometheusRule>(&client, ns), &w);
        controller = controller.owns_shared_stream(sm_stream).owns_shared_stream(pr_stream);
        (Some(sm), Some(pr))
    } else {
        (None, None)
    };

    let by_tier = endpoints.clone();
    let by_keys = endpoints.clone();
    let by_backup = endpoints.clone();
    let controller = controller
        .watches_shared_stream(tier_stream, move |tier: Arc<RateLimitTier>| {
            let name = tier.name_any();
            referencing(&by_tier, |ep| ep.spec.rate_limit.as_ref().is_some_and(|r| r.tier == name))
        })
        .watches_shared_stream(krs_stream, move |krs: Arc<KeyRotationSchedule>| {
            let (name, ns) = (krs.name_any(), krs.namespace());
            referencing(&by_keys, |ep| ep.namespace() == ns && ep.spec.auth.api_keys.contains(&name))
        })
        .watches_shared_stream(backup_stream, move |policy: Arc<BackupPolicy>| {
            let ns = policy.namespace();
            referencing(&by_backup, |ep| ep.namespace() == ns && ep.name_any() == policy.spec.endpoint)
        })
        .reconcile_on(key_hint_reconciles(&settings.jwks, namespace.clone()))
        .graceful_shutdown_on(shutdown);

    let caches = Caches {
        tiers,
        key_schedules,
        backups,
        service_accounts,
        config_maps,
        secrets,
        deployments,
        services,
        network_policies,
        pdbs,
        pdbs_v1beta1,
        service_monitors,
        prometheus_rules,
    };
    let reporter = Reporter { controller: "fhir-operator".into(), instance: settings.instance.clone() };
    let context = Arc::new(Context {
        applier: shared.applier.clone(),
        caches: caches.clone(),
        capabilities: RwLock::new(caps),
        images: settings.images.clone(),
        jwks: settings.jwks.clone(),
        key_hints: settings.key_hints.clone(),
        audit_checks: Default::default(),
        clock: shared.clock.clone(),
        metrics: shared.metrics.clone(),
        recorder: Recorder::new(client.clone(), reporter),
    });
    let capabilities = shared.capabilities.clone();
    let refresh_context = context.clone();

    // Readiness: once every cache is filled (the streams start when the
    // controller runs, so wait beside it).
    let wait_for_caches = async move {
        let c = &caches;
        let waits = [
            c.tiers.wait_until_ready().boxed(),
            c.key_schedules.wait_until_ready().boxed(),
            c.backups.wait_until_ready().boxed(),
            c.service_accounts.wait_until_ready().boxed(),
            c.config_maps.wait_until_ready().boxed(),
            c.secrets.wait_until_ready().boxed(),
            c.deployments.wait_until_ready().boxed(),
            c.services.wait_until_ready().boxed(),
            c.network_policies.wait_until_ready().boxed(),
        ];
        let _ = future::join_all(waits).await;
        info!(scope = namespace.as_deref().unwrap_or("all namespaces"), "caches filled");
        ready();
        // Later capability changes (e.g. a PDB API) reach reconciles here.
        loop {
            tokio::time::sleep(settings.discovery_interval).await;
            let now = capabilities.read().map(|c| *c).unwrap_or_default();
            if let Ok(mut mine) = refresh_context.capabilities.write() {
                *mine = Capabilities { monitoring: now.monitoring && caps.monitoring, pdb: now.pdb };
            }
        }
    };
    let run = controller.run(reconcile::reconcile, reconcile::error_policy, context).for_each(|result| async move {
        if let Err(e) = result {
            warn!(error = %e, "controller event");
        }
    });
    async move {
        tokio::select! {
            _ = run => {}
            _ = wait_for_caches => {}
        }
    }
}

/// Rediscovers optional APIs every `interval`, logging changes.
pub async fn refresh_capabilities(client: Client, capabilities: Arc<RwLock<Capabilities>>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match discovery::discover(&client).await {
            Ok(found) => {
                let changed = capabilities.read().map(|c| *c != found).unwrap_or(false);
                if changed {
                    info!(?found, "optional APIs changed; new watches start with the next operator start");
                    if let Ok(mut c) = capabilities.write() {
                        *c = found;
                    }
                }
            }
            Err(e) => warn!(error = %e, "API discovery failed; keeping what was known"),
        }
    }
}
