//! One watch per kind and scope, shared by every controller that reads it.
//!
//! Four controllers read FhirEndpoints, three the key schedules and backup
//! policies, two the operator's Secrets, ConfigMaps and rate-limit tiers.
//! Each used to run its own watch and keep its own cache: four copies of
//! every endpoint, and four watches the API server fed with every change.
//! Here each (kind, URL, selector) is watched once; its cache (a reflector
//! store) is shared, and each controller subscribes to the stream of the
//! objects the watch touched (listed, applied or deleted), which triggers
//! its reconciles.
//!
//! The fan-out waits for the slowest subscriber (a bounded broadcast
//! channel), so no subscriber ever misses an object: a missed deletion of a
//! child would leave it deleted. Every controller subscribes while it is
//! set up, before [`Caches::start`] starts the watches, so each sees every
//! object from the first list on. Every subscriber keeps its own watch
//! probe (its `/healthz` line and watch metrics), fed by the one watch.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;

use crate::apply::{ChildKind, watch_children, watch_related};
use crate::health::{ControllerWatches, WatchProbes};

/// Objects in flight between a watch and its slowest subscriber.
const FAN_OUT_BUFFER: usize = 1024;

/// A shared cache and the stream of its touched objects, for one subscriber.
pub type Cached<K> = (Store<K>, BoxStream<'static, Arc<K>>);

/// The shared watches of one run of the controllers, while the controllers
/// are set up: they subscribe here, then [`Caches::start`] starts the watches.
#[derive(Default)]
pub struct Caches {
    /// One [`Shared`] per (kind, URL and selector), type-erased.
    watches: Mutex<HashMap<(TypeId, String), Box<dyn Any + Send>>>,
    /// Each watch's fan-out, to be spawned by [`Caches::start`].
    pending: Mutex<Vec<BoxFuture<'static, ()>>>,
}

struct Shared<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    fan_out: async_broadcast::Sender<Arc<K>>,
    /// The channel's first receiver, for the first subscriber: the
    /// channel closes when it has no receiver at all.
    first: Option<async_broadcast::Receiver<Arc<K>>>,
    probes: WatchProbes,
}

/// The running watches; dropping this stops them.
pub struct Running(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

impl Caches {
    /// The operator's own children of kind `K` in `api`'s scope (the
    /// managed-by selector, slimmed as [`ChildKind::slim`] says).
    pub fn children<K: ChildKind>(&self, api: Api<K>, watches: &ControllerWatches) -> Cached<K> {
        let key = format!("children {}", api.resource_url());
        self.subscribe(key, api, watches, |api, probes, timeout| {
            let (store, stream) = watch_children(api, probes, timeout);
            (store, stream.boxed())
        })
    }

    /// Every object of kind `K` in `api`'s scope.
    pub fn related<K>(&self, api: Api<K>, watches: &ControllerWatches) -> Cached<K>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let key = format!("all {}", api.resource_url());
        self.subscribe(key, api, watches, |api, probes, timeout| {
            let (store, stream) = watch_related(api, probes, timeout);
            (store, stream.boxed())
        })
    }

    /// Starts every watch subscribed to.
    pub fn start(self) -> Running {
        let pending = self.pending.into_inner().unwrap_or_else(|e| e.into_inner());
        Running(pending.into_iter().map(tokio::spawn).collect())
    }

    fn subscribe<K>(
        &self,
        key: String,
        api: Api<K>,
        watches: &ControllerWatches,
        start: impl FnOnce(Api<K>, WatchProbes, u32) -> (Store<K>, WatchStream<K>),
    ) -> Cached<K>
    where
        K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
    {
        let probe = watches.probe(&api);
        let mut all = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry((TypeId::of::<K>(), key)).or_insert_with(|| {
            let probes = WatchProbes::default();
            let (store, stream) = start(api, probes.clone(), watches.server_timeout());
            let (fan_out, first) = async_broadcast::broadcast(FAN_OUT_BUFFER);
            let run = fan_out_touched(stream, fan_out.clone()).boxed();
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push(run);
            Box::new(Shared { store, fan_out, first: Some(first), probes })
        });
        #[allow(clippy::expect_used)] // the key holds the TypeId of K
        let shared = entry.downcast_mut::<Shared<K>>().expect("a shared watch of another kind under K's key");
        shared.probes.add(probe);
        let live = shared.first.take().unwrap_or_else(|| shared.fan_out.new_receiver());
        (shared.store.clone(), live.boxed())
    }
}

type WatchStream<K> = BoxStream<'static, Result<K, watcher::Error>>;

/// Hands every object the watch touched to every subscriber; watch errors
/// were already reported to the probes, and the watch starts over by itself.
async fn fan_out_touched<K>(
    mut stream: impl Stream<Item = Result<K, watcher::Error>> + Unpin,
    fan_out: async_broadcast::Sender<Arc<K>>,
) {
    while let Some(item) = stream.next().await {
        if let Ok(obj) = item {
            // Fails only when no subscriber listens (they start from the
            // cache) or all are gone.
            let _ = fan_out.broadcast_direct(Arc::new(obj)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broadcast_waits_for_the_slowest_subscriber_and_loses_nothing() {
        let (tx, first) = async_broadcast::broadcast::<Arc<u32>>(2);
        let second = tx.new_receiver();
        let sender = tokio::spawn(fan_out_touched(futures::stream::iter((0..10).map(Ok::<u32, watcher::Error>)), tx));
        // The second is read only after the first has all: the sender waits
        // for it rather than dropping what it has not read.
        let slow = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            second.map(|n| *n).collect::<Vec<u32>>().await
        });
        let fast: Vec<u32> = first.map(|n| *n).collect().await;
        let slow = slow.await.unwrap();
        sender.await.unwrap();
        assert_eq!(fast, (0..10).collect::<Vec<_>>());
        assert_eq!(slow, (0..10).collect::<Vec<_>>());
    }
}
