//! Server-side apply of children, and the caches that let a reconcile skip
//! writes that would change nothing.
//!
//! Every child kind is watched once, filtered to objects the operator
//! manages; the same stream fills a cache (a reflector store) and triggers
//! reconciles of the owner. Cached objects are slimmed first: no
//! managedFields, no labels or annotations the operator does not read, no
//! Secret or ConfigMap data (key material never sits in the operator's
//! memory longer than one apply), no Deployment, Service or NetworkPolicy
//! spec.
//!
//! A child is written when it is missing from the cache, when its desired
//! content changed, or when someone else changed it since the operator last
//! wrote it (drift: a hand edit or deletion). "Since the operator last wrote
//! it" is the child's [`ChildKind::observed_version`] as the API server
//! returned it to the operator's last apply: the resourceVersion for most
//! kinds, the generation for Deployments (whose status others write), the
//! operator's own fields for ServiceAccounts (which Kubernetes amends). After a
//! restart the operator re-applies every child once, which also puts back
//! whatever drifted while it was down.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::health::WatchProbes;
use crate::meta::{APPLIED_HASH_ANNOTATION, MANAGED_SELECTOR, hash_of};

/// Objects per page when a watch (re)lists. A page is deserialized whole,
/// managedFields and all, before the cache slims it: kube's default of 500
/// Deployments made the operator's peak memory (measured with heaptrack at
/// 1,000 endpoints); 100 keeps that transient small for a few more requests.
pub const LIST_PAGE_SIZE: u32 = 100;

/// A kind of child object the operator creates and caches.
pub trait ChildKind:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Whether the cache keeps every label and annotation (kinds whose
    /// controller reads them). Others keep only the applied-hash
    /// annotation, and their labels only with [`ChildKind::KEEPS_LABELS`]:
    /// at 1,000 endpoints a heap profile showed the cached children's
    /// metadata as the largest part of the operator's memory.
    const KEEPS_METADATA: bool = false;
    const KEEPS_LABELS: bool = false;

    /// What changes when someone else changes what the operator set:
    /// by default the resourceVersion (any change at all). Computed on the
    /// object as the cache holds it ([`cache_view`]).
    fn observed_version(&self) -> String {
        self.resource_version().unwrap_or_default()
    }

    /// Drops what the cache need not hold, beyond metadata.
    fn slim(&mut self) {}
}

/// Makes `obj` what the cache holds of it: no managedFields, the metadata
/// the operator reads, and [`ChildKind::slim`].
pub fn cache_view<K: ChildKind>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if !K::KEEPS_METADATA {
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.retain(|k, _| k == APPLIED_HASH_ANNOTATION);
        }
        if !K::KEEPS_LABELS {
            meta.labels = None;
        }
    }
    obj.slim();
}

impl ChildKind for ServiceAccount {
    const KEEPS_LABELS: bool = true;

    /// Kubernetes' token controller (before 1.24) adds `secrets` to every
    /// ServiceAccount: not drift. What the operator sets is checked instead.
    fn observed_version(&self) -> String {
        hash_of(&(&self.automount_service_account_token, &self.metadata.labels, &self.metadata.annotations))
    }
}

/// Drift shows in the resourceVersion; nothing of the spec is read.
impl ChildKind for Service {
    fn slim(&mut self) {
        self.spec = None;
        self.status = None;
    }
}

impl ChildKind for NetworkPolicy {
    fn slim(&mut self) {
        self.spec = None;
    }
}

impl ChildKind for ConfigMap {
    fn slim(&mut self) {
        self.data = None;
        self.binary_data = None;
    }
}

impl ChildKind for Secret {
    /// Keeps only the public certificate (`tls.crt`), which the TLS check
    /// reads; never key material.
    fn slim(&mut self) {
        if let Some(data) = self.data.as_mut() {
            data.retain(|k, _| k == "tls.crt");
        }
        self.string_data = None;
    }
}

/// For kinds whose status other controllers write: a change of what the
/// operator set bumps the generation, a status update does not.
pub fn generation_version<K: Resource>(obj: &K) -> String {
    obj.meta().generation.unwrap_or_default().to_string()
}

impl ChildKind for Job {
    /// The backup controller reads the labels and annotations.
    const KEEPS_METADATA: bool = true;

    /// The cache keeps labels, annotations and status: not the pod template.
    fn slim(&mut self) {
        self.spec = None;
    }
}

impl ChildKind for Deployment {
    /// The deployment controller writes the status and a revision annotation.
    fn observed_version(&self) -> String {
        generation_version(self)
    }

    fn slim(&mut self) {
        self.spec = None;
    }
}

/// The cache of one child kind and the stream that fills it; poll the
/// stream (e.g. hand it to `Controller::owns_stream`) or the cache stays empty.
pub fn watch_children<K: ChildKind>(
    api: Api<K>,
    probes: WatchProbes,
    server_timeout: u32,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static) {
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(MANAGED_SELECTOR);
    let stream = resilient_watcher(api, config, probes, server_timeout)
        .modify(cache_view::<K>)
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}

/// A watched kind that is not a child (the operator's own kinds): its
/// cache and the stream that fills it and triggers reconciles.
pub fn watch_related<K>(
    api: Api<K>,
    probes: WatchProbes,
    server_timeout: u32,
) -> (Store<K>, impl Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = resilient_watcher(api, watcher::Config::default(), probes, server_timeout)
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}

/// kube's watcher, made to recover from every fault the same way: after
/// any error (the API server gone, `410 Gone`, a request that timed out on
/// a dead connection, the kind's CRD deleted) the watch starts over with a
/// fresh list, after a backoff. The list replaces the cache, and every
/// object it holds triggers a reconcile of its owner: whatever changed
/// while the watch was blind is noticed. The server ends each watch
/// request after `server_timeout` seconds, and every event, list and
/// error is reported to the watch's probes (`/healthz`, `/readyz`, the
/// watch metrics).
fn resilient_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    probes: WatchProbes,
    server_timeout: u32,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    use futures::StreamExt;
    use futures::stream::BoxStream;
    let config = config.page_size(LIST_PAGE_SIZE).timeout(server_timeout);
    let start = move |api: &Api<K>, config: &watcher::Config| watcher(api.clone(), config.clone()).boxed();
    let first: Option<BoxStream<'static, _>> = None;
    futures::stream::unfold((first, api, config, probes), move |(inner, api, config, probes)| async move {
        let mut inner = inner.unwrap_or_else(|| start(&api, &config));
        loop {
            match inner.next().await {
                Some(item) => {
                    probes.observe(&item);
                    if let Err(e) = &item {
                        tracing::debug!(error = %e, kind = %K::kind(&()), "watch failed; starting over with a list");
                    }
                    let keep = item.is_ok().then_some(inner);
                    return Some((item, (keep, api, config, probes)));
                }
                // kube's watcher does not end; should it, start anew.
                None => inner = start(&api, &config),
            }
        }
    })
    .backoff(WatchBackoff::default())
}

/// The wait before a failed watch starts over: 0.5 s, doubling up to 8 s
/// (a watch is back within seconds of the API server), and from 0.5 s
/// again once no error came for 30 s. (The restarted watcher's first event
/// would reset a plain backoff at every attempt.)
#[derive(Debug, Default)]
pub struct WatchBackoff {
    next: Duration,
    last: Option<std::time::Instant>,
}

impl WatchBackoff {
    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(8);
    const RESET_AFTER: Duration = Duration::from_secs(30);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = std::time::Instant::now();
        if self.last.is_none_or(|last| now.duration_since(last) > Self::RESET_AFTER) {
            self.next = Self::MIN;
        }
        self.last = Some(now);
        let wait = self.next;
        self.next = (wait * 2).min(Self::MAX);
        Some(wait)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    /// Called on every successful event: ignored, see above.
    fn reset(&mut self) {}
}

/// For `Controller::trigger_backoff`: none. kube's controller otherwise
/// puts one backoff on all of its watches together, so that an error of
/// any one of them stops every one (its default grows to 30 s and resets
/// only after two quiet minutes): after an API server restart, each
/// watch's `410 Gone` in turn kept the whole controller asleep, and it
/// reconciled nothing for minutes. Each watch backs off on its own
/// instead ([`WatchBackoff`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSharedBackoff;

impl Iterator for NoSharedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoSharedBackoff {
    fn reset(&mut self) {}
}

/// Runs a controller's reconcile stream until it ends (on shutdown), and
/// calls `ready` once `caches_filled` completes. Failed reconciles are
/// logged here; their errors are counted by each controller's error policy.
pub async fn drive<T, E: std::fmt::Display>(
    run: impl Stream<Item = Result<T, E>>,
    caches_filled: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(),
    controller: &'static str,
    scope: Option<&str>,
) {
    use futures::StreamExt;
    let run = run.for_each(|result| async move {
        if let Err(e) = result {
            tracing::warn!(controller, error = %e, "controller event");
        }
    });
    let ready_then_wait = async move {
        caches_filled.await;
        tracing::info!(controller, scope = scope.unwrap_or("all namespaces"), "caches filled");
        ready();
        futures::future::pending::<()>().await
    };
    tokio::select! {
        _ = run => {}
        _ = ready_then_wait => {}
    }
}

/// An API of a namespaced kind in one namespace, or in all.
pub(crate) fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the operator last wrote to one child.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    hash: String,
    version: String,
}

/// What [`Applier::ensure`] did.
#[derive(Debug)]
pub enum Applied<K> {
    /// Nothing to write: the cached object is as last applied.
    Unchanged(Arc<K>),
    /// Written, because it was missing, changed, or drifted; the API
    /// server's answer.
    Written { object: K, reason: WriteReason },
}

impl<K> Applied<K> {
    pub fn written(&self) -> Option<WriteReason> {
        match self {
            Applied::Unchanged(_) => None,
            Applied::Written { reason, .. } => Some(*reason),
        }
    }
}

impl<K: Clone> Applied<K> {
    /// The object as the API server last showed it.
    pub fn into_object(self) -> K {
        match self {
            Applied::Unchanged(obj) => Arc::unwrap_or_clone(obj),
            Applied::Written { object, .. } => object,
        }
    }
}

/// Why a child was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteReason {
    /// Not in the cluster (new, or deleted by hand).
    Missing,
    /// The desired content changed (spec change, new config).
    Changed,
    /// Changed by someone else since the operator wrote it.
    Drifted,
    /// First write since the operator started.
    Unknown,
}

impl WriteReason {
    /// The metric label: `missing`, `changed`, `drifted` or `unknown`.
    pub fn label(self) -> &'static str {
        match self {
            WriteReason::Missing => "missing",
            WriteReason::Changed => "changed",
            WriteReason::Drifted => "drifted",
            WriteReason::Unknown => "unknown",
        }
    }
}

/// Applies children with one field manager, remembering what it wrote.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    params: PatchParams,
    written: Arc<Mutex<HashMap<String, Written>>>,
}

impl Applier {
    /// `field_manager` names the writer, e.g. `fhir-operator/fhirendpoint`.
    pub fn new(client: Client, field_manager: &str) -> Self {
        Self {
            client,
            params: PatchParams::apply(field_manager).force(),
            written: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Makes the child look as desired, writing only when needed.
    pub async fn ensure<K: ChildKind>(&self, cache: &Store<K>, mut desired: K) -> Result<Applied<K>, kube::Error> {
        let hash = hash_of(&desired);
        desired.annotations_mut().insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
        let name = desired.name_any();
        let ns = desired.namespace().unwrap_or_default();
        let key = format!("{}/{ns}/{name}", K::kind(&()));
        let cached = cache.get(&ObjectRef::new(&name).within(&ns));
        let last = self.written.lock().ok().and_then(|w| w.get(&key).cloned());
        let reason = match (&cached, &last) {
            (None, _) => WriteReason::Missing,
            (Some(obj), _) if obj.annotations().get(APPLIED_HASH_ANNOTATION) != Some(&hash) => WriteReason::Changed,
            (Some(_), None) => WriteReason::Unknown,
            (Some(obj), Some(last)) if obj.observed_version() != last.version => WriteReason::Drifted,
            (Some(obj), Some(_)) => return Ok(Applied::Unchanged(obj.clone())),
        };
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let object = api.patch(&name, &self.params, &Patch::Apply(&desired)).await?;
        let mut seen = object.clone();
        cache_view(&mut seen);
        if let Ok(mut written) = self.written.lock() {
            written.insert(key, Written { hash, version: seen.observed_version() });
        }
        Ok(Applied::Written { object, reason })
    }

    /// Deletes a child the owner no longer wants, if the cache holds it.
    /// Returns whether a delete was sent.
    pub async fn remove<K: ChildKind>(
        &self,
        cache: &Store<K>,
        namespace: &str,
        name: &str,
    ) -> Result<bool, kube::Error> {
        if cache.get(&ObjectRef::new(name).within(namespace)).is_none() {
            return Ok(false);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
        if let Ok(mut written) = self.written.lock() {
            written.remove(&format!("{}/{namespace}/{name}", K::kind(&())));
        }
        Ok(true)
    }
}

/// Server-side applies `status` to the status subresource of `name`, as
/// `field_manager`: the one way every controller writes status (callers
/// skip the call when the status is unchanged).
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S, field_manager: &str) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(field_manager).force(), &Patch::Apply(patch)).await?;
    Ok(())
}

/// Publishes an event about `object`; a failure to record it is logged,
/// not fatal.
pub async fn publish_event<K: Resource<DynamicType = ()>>(
    recorder: &kube::runtime::events::Recorder,
    object: &K,
    event: kube::runtime::events::Event,
) {
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, reason = event.reason, "could not record an event");
    }
}
