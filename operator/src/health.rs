//! Whether the operator's watches work: the truth behind `/readyz`,
//! `/healthz` and the per-watch metrics.
//!
//! Every watch the controllers hold is registered here and followed through
//! two signs of life:
//! - its event stream: a (re)list begun, finished, an object seen, an error;
//! - the HTTP layer of the operator's client ([`SignOfLifeLayer`]): each
//!   time the API server answers a watch request of that resource. Watches
//!   ask the server to end them after [`Watches::server_timeout`], so a
//!   healthy watch on a quiet cluster is answered again at least that
//!   often, and a watch whose connection hangs without closing stops
//!   showing signs of life.
//!
//! A watch is *synced* between the end of a list and the next error (after
//! an error the watch starts over with a fresh list, see
//! [`crate::apply`]). A watch is *stalled* when it has not been synced, or
//! has shown no sign of life, for longer than the stall limit: then
//! `/healthz` fails, so that Kubernetes restarts a process that cannot
//! recover by itself. `/readyz` needs every watch synced.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::Api;
use kube::runtime::watcher;

use crate::conditions::Clock;
use crate::metrics::{Metrics, WatchLabels};

/// How long a watch may stay unsynced or silent before `/healthz` fails.
pub const DEFAULT_STALL_LIMIT: Duration = Duration::from_secs(120);

/// What one watch has shown; pure, driven by [`WatchState::on`] with the
/// time of each sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchState {
    /// A list finished and no error came since.
    pub synced: bool,
    /// Since when it has not been synced (`None` while synced).
    pub unsynced_since: Option<Timestamp>,
    /// The last sign of life: a list finished, an object seen, or the API
    /// server answering a watch request.
    pub last_alive: Timestamp,
    /// Lists begun (the first, and one per restart of the watch).
    pub lists: u64,
}

/// A sign from a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// A (re)list begun.
    ListStarted,
    /// An object listed or an event received.
    Object,
    /// The list finished: the cache is complete.
    ListDone,
    /// The API server answered a watch request.
    Answered,
    /// The watch failed; it starts over with a fresh list.
    Failed,
}

/// Why a watch is stalled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stall {
    /// Not synced for this long.
    Unsynced(Duration),
    /// Synced, but no sign of life for this long.
    Silent(Duration),
}

impl WatchState {
    pub fn new(now: Timestamp) -> Self {
        Self { synced: false, unsynced_since: Some(now), last_alive: now, lists: 0 }
    }

    pub fn on(&mut self, sign: Sign, now: Timestamp) {
        match sign {
            Sign::ListStarted => {
                self.lists += 1;
                self.synced = false;
                self.unsynced_since.get_or_insert(now);
            }
            Sign::Object | Sign::Answered => self.last_alive = now,
            Sign::ListDone => {
                self.synced = true;
                self.unsynced_since = None;
                self.last_alive = now;
            }
            Sign::Failed => {
                self.synced = false;
                self.unsynced_since.get_or_insert(now);
            }
        }
    }

    /// Restarts of the watch: lists after the first.
    pub fn restarts(&self) -> u64 {
        self.lists.saturating_sub(1)
    }

    /// Whether the watch has been unable to watch for longer than `limit`.
    /// An unsynced watch failed at `unsynced_since` at the latest. A
    /// synced one was last known to work at its last sign of life, and an
    /// answered watch request stays open for up to `request_timeout`
    /// after it: so it counts as failed from `last_alive +
    /// request_timeout`, never earlier than it really could have.
    pub fn stall(&self, now: Timestamp, limit: Duration, request_timeout: Duration) -> Option<Stall> {
        if let Some(since) = self.unsynced_since {
            let unsynced = age(now, since);
            return (unsynced > limit).then_some(Stall::Unsynced(unsynced));
        }
        let silent = self.silent_for(now);
        (silent > limit + request_timeout).then_some(Stall::Silent(silent))
    }

    /// Time since the last sign of life.
    pub fn silent_for(&self, now: Timestamp) -> Duration {
        age(now, self.last_alive)
    }
}

fn age(now: Timestamp, since: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

/// One registered watch.
struct Entry {
    labels: WatchLabels,
    /// The resource's URL path, as the HTTP layer sees the watch request.
    path: String,
    state: WatchState,
}

struct Inner {
    clock: Arc<dyn Clock>,
    stall_limit: Duration,
    metrics: Arc<Metrics>,
    watches: Mutex<Vec<Entry>>,
}

/// Every watch of this process. Cheap to clone.
#[derive(Clone)]
pub struct Watches(Arc<Inner>);

impl Watches {
    pub fn new(clock: Arc<dyn Clock>, stall_limit: Duration, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Inner { clock, stall_limit, metrics, watches: Mutex::new(Vec::new()) }))
    }

    pub fn stall_limit(&self) -> Duration {
        self.0.stall_limit
    }

    /// How long the API server keeps one watch request open: a third of
    /// the stall limit (5 s to the server's usual 290 s), so that a healthy
    /// watch is answered anew well within the limit.
    pub fn server_timeout(&self) -> u32 {
        (self.0.stall_limit.as_secs() / 3).clamp(5, 290) as u32
    }

    /// The client's read timeout: longer than a watch request may stay
    /// quiet (its server timeout), short enough that a request stuck on a
    /// dead connection fails and is retried.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.server_timeout()) + 10)
    }

    /// The watches of one controller in one scope.
    pub fn controller(&self, controller: &'static str, scope: Option<&str>) -> ControllerWatches {
        ControllerWatches { watches: self.clone(), controller, scope: scope.unwrap_or_default().to_owned() }
    }

    fn register(&self, labels: WatchLabels, path: String) -> WatchProbe {
        let now = self.0.clock.now();
        let mut watches = self.0.watches.lock().unwrap_or_else(|e| e.into_inner());
        let index = watches.len();
        self.publish(&labels, &WatchState::new(now));
        watches.push(Entry { labels, path, state: WatchState::new(now) });
        WatchProbe { watches: self.clone(), index }
    }

    fn sign(&self, index: usize, sign: Sign) {
        let now = self.0.clock.now();
        let mut watches = self.0.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = watches.get_mut(index) {
            entry.state.on(sign, now);
            self.publish(&entry.labels, &entry.state);
        }
    }

    /// The API server answered a watch request on `path`.
    fn answered(&self, path: &str) {
        let now = self.0.clock.now();
        let mut watches = self.0.watches.lock().unwrap_or_else(|e| e.into_inner());
        for entry in watches.iter_mut().filter(|e| e.path == path) {
            entry.state.on(Sign::Answered, now);
            self.publish(&entry.labels, &entry.state);
        }
    }

    fn publish(&self, labels: &WatchLabels, state: &WatchState) {
        let m = &self.0.metrics;
        m.watch_last_alive.get_or_create(labels).set(state.last_alive.as_millisecond() as f64 / 1000.0);
        m.watch_synced.get_or_create(labels).set(i64::from(state.synced));
        let restarts = m.watch_restarts.get_or_create(labels);
        let behind = state.restarts().saturating_sub(restarts.get());
        restarts.inc_by(behind);
    }

    /// Whether every registered watch is synced and was heard from
    /// lately (at least one is registered). A healthy watch is answered at
    /// least every [`Self::server_timeout`]; silence for twice that means
    /// its cache may be missing changes already.
    pub fn all_synced(&self) -> bool {
        let now = self.0.clock.now();
        let fresh = Duration::from_secs(2 * u64::from(self.server_timeout()));
        let watches = self.0.watches.lock().unwrap_or_else(|e| e.into_inner());
        !watches.is_empty() && watches.iter().all(|e| e.state.synced && e.state.silent_for(now) <= fresh)
    }

    /// `Err` naming the first stalled watch and why.
    pub fn live(&self) -> Result<(), String> {
        let now = self.0.clock.now();
        let watches = self.0.watches.lock().unwrap_or_else(|e| e.into_inner());
        for entry in watches.iter() {
            let request_timeout = Duration::from_secs(self.server_timeout().into());
            if let Some(stall) = entry.state.stall(now, self.0.stall_limit, request_timeout) {
                let WatchLabels { controller, kind, scope } = &entry.labels;
                let scope = if scope.is_empty() { "all namespaces" } else { scope };
                let why = match stall {
                    Stall::Unsynced(d) => format!("not synced for {} s", d.as_secs()),
                    Stall::Silent(d) => format!("no answer from the API server for {} s", d.as_secs()),
                };
                return Err(format!(
                    "controller {controller}: watch of {kind} ({scope}) {why} (limit {} s)",
                    self.0.stall_limit.as_secs()
                ));
            }
        }
        Ok(())
    }

    /// The tower layer that reports answered watch requests.
    pub fn layer(&self) -> SignOfLifeLayer {
        SignOfLifeLayer(self.clone())
    }
}

/// Registers the watches of one controller in one scope.
#[derive(Clone)]
pub struct ControllerWatches {
    watches: Watches,
    controller: &'static str,
    scope: String,
}

impl ControllerWatches {
    /// A probe for the watch of `api`'s kind.
    pub fn probe<K: Resource<DynamicType = ()>>(&self, api: &Api<K>) -> WatchProbe {
        let labels =
            WatchLabels { controller: self.controller, kind: K::kind(&()).into_owned(), scope: self.scope.clone() };
        self.watches.register(labels, api.resource_url().to_owned())
    }

    pub fn server_timeout(&self) -> u32 {
        self.watches.server_timeout()
    }
}

/// Reports the signs of one watch.
pub struct WatchProbe {
    watches: Watches,
    index: usize,
}

impl WatchProbe {
    /// Follows one item of the watch's stream.
    pub fn observe<K>(&self, item: &Result<watcher::Event<K>, watcher::Error>) {
        let sign = match item {
            Ok(watcher::Event::Init) => Sign::ListStarted,
            Ok(watcher::Event::InitApply(_) | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => Sign::Object,
            Ok(watcher::Event::InitDone) => Sign::ListDone,
            Err(_) => Sign::Failed,
        };
        self.watches.sign(self.index, sign);
    }
}

/// The probes of every controller that reads one shared watch
/// ([`crate::caches`]): each controller keeps its own probe (its `/healthz`
/// line and watch metrics), all fed by the one watch. A probe added after
/// the watch began its first list catches up on what it missed.
#[derive(Clone, Default)]
pub struct WatchProbes(Arc<Mutex<ProbeSet>>);

#[derive(Default)]
struct ProbeSet {
    probes: Vec<WatchProbe>,
    listed: bool,
    synced: bool,
}

impl WatchProbes {
    pub fn add(&self, probe: WatchProbe) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if set.listed {
            probe.watches.sign(probe.index, Sign::ListStarted);
        }
        if set.synced {
            probe.watches.sign(probe.index, Sign::ListDone);
        }
        set.probes.push(probe);
    }

    /// Follows one item of the watch's stream, for every probe.
    pub fn observe<K>(&self, item: &Result<watcher::Event<K>, watcher::Error>) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match item {
            Ok(watcher::Event::Init) => (set.listed, set.synced) = (true, false),
            Ok(watcher::Event::InitDone) => set.synced = true,
            Err(_) => set.synced = false,
            Ok(_) => {}
        }
        for probe in &set.probes {
            probe.observe(item);
        }
    }
}

/// A tower layer for the operator's client: each successful answer to a
/// watch request is a sign of life of the watches of that resource.
#[derive(Clone)]
pub struct SignOfLifeLayer(Watches);

impl<S> tower_layer::Layer<S> for SignOfLifeLayer {
    type Service = SignOfLife<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SignOfLife { inner, watches: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct SignOfLife<S> {
    inner: S,
    watches: Watches,
}

/// `Some(path)` for a watch request (`watch=true` or `watch=1`).
fn watch_path(uri: &http::Uri) -> Option<String> {
    let query = uri.query()?;
    query.split('&').any(|p| p == "watch=true" || p == "watch=1").then(|| uri.path().to_owned())
}

impl<S, B, ReqBody> tower_service::Service<http::Request<ReqBody>> for SignOfLife<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = watch_path(request.uri());
        let watches = self.watches.clone();
        self.inner
            .call(request)
            .map(move |result| {
                if let (Some(path), Ok(response)) = (path, &result)
                    && response.status().is_success()
                {
                    watches.answered(&path);
                }
                result
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    const LIMIT: Duration = Duration::from_secs(120);
    const REQUEST: Duration = Duration::from_secs(40);

    #[test]
    fn a_new_watch_is_unsynced_until_its_list_ends_and_stalls_after_the_limit() {
        let mut w = WatchState::new(t(0));
        w.on(Sign::ListStarted, t(0));
        assert!(!w.synced);
        assert_eq!(w.stall(t(120), LIMIT, REQUEST), None, "exactly the limit is not over it");
        assert_eq!(w.stall(t(121), LIMIT, REQUEST), Some(Stall::Unsynced(Duration::from_secs(121))));
        w.on(Sign::ListDone, t(122));
        assert!(w.synced);
        assert_eq!(w.stall(t(122), LIMIT, REQUEST), None);
        assert_eq!(w.restarts(), 0);
    }

    #[test]
    fn a_failure_counts_from_its_first_error_not_from_the_retries() {
        let mut w = WatchState::new(t(0));
        w.on(Sign::ListStarted, t(0));
        w.on(Sign::ListDone, t(1));
        w.on(Sign::Failed, t(10));
        for s in [12, 20, 40, 80] {
            w.on(Sign::ListStarted, t(s));
            w.on(Sign::Failed, t(s));
        }
        assert!(!w.synced);
        assert_eq!(w.stall(t(130), LIMIT, REQUEST), None);
        assert_eq!(w.stall(t(131), LIMIT, REQUEST), Some(Stall::Unsynced(Duration::from_secs(121))));
        assert_eq!(w.restarts(), 4);
        // Recovery: a fresh list ends; healthy again at once.
        w.on(Sign::ListStarted, t(140));
        w.on(Sign::ListDone, t(141));
        assert_eq!(w.stall(t(141), LIMIT, REQUEST), None);
        assert_eq!(w.restarts(), 5);
    }

    #[test]
    fn a_synced_watch_stays_live_while_the_server_answers_and_stalls_when_silent() {
        let mut w = WatchState::new(t(0));
        w.on(Sign::ListStarted, t(0));
        w.on(Sign::ListDone, t(0));
        // The server ends each watch request after its timeout; each new
        // answer is a sign of life.
        for s in (40..=400).step_by(40) {
            w.on(Sign::Answered, t(s));
            assert_eq!(w.stall(t(s + 39), LIMIT, REQUEST), None);
        }
        // Then nothing: a connection that hangs without closing. The last
        // answered request may have worked until 440: failed only after
        // 440 + the limit.
        assert_eq!(w.stall(t(560), LIMIT, REQUEST), None);
        assert_eq!(w.stall(t(561), LIMIT, REQUEST), Some(Stall::Silent(Duration::from_secs(161))));
        // Events are signs of life too.
        w.on(Sign::Object, t(561));
        assert_eq!(w.stall(t(562), LIMIT, REQUEST), None);
    }

    #[test]
    fn answers_do_not_make_an_unsynced_watch_healthy() {
        let mut w = WatchState::new(t(0));
        w.on(Sign::ListStarted, t(0));
        w.on(Sign::Answered, t(100));
        assert!(matches!(w.stall(t(121), LIMIT, REQUEST), Some(Stall::Unsynced(_))));
    }

    struct Manual(Mutex<Timestamp>);
    impl Clock for Manual {
        fn now(&self) -> Timestamp {
            *self.0.lock().unwrap()
        }
    }

    #[test]
    fn the_registry_names_the_stalled_watch_and_answers_reach_watches_by_path() {
        let clock = Arc::new(Manual(Mutex::new(t(0))));
        let metrics = Arc::new(Metrics::default());
        let watches = Watches::new(clock.clone(), LIMIT, metrics.clone());
        let a = watches.register(
            WatchLabels { controller: "fhirendpoint", kind: "Deployment".into(), scope: String::new() },
            "/apis/apps/v1/deployments".into(),
        );
        let b = watches.register(
            WatchLabels { controller: "keyrotation", kind: "Secret".into(), scope: "clinical".into() },
            "/api/v1/namespaces/clinical/secrets".into(),
        );
        assert!(!watches.all_synced());
        for p in [&a, &b] {
            p.observe::<()>(&Ok(watcher::Event::Init));
            p.observe::<()>(&Ok(watcher::Event::InitDone));
        }
        assert!(watches.all_synced());
        assert_eq!(watches.live(), Ok(()));

        // The limit (120 s) plus one request's timeout (40 s) after the
        // last sign of life of the Secret watch.
        *clock.0.lock().unwrap() = t(100);
        watches.answered("/apis/apps/v1/deployments");
        *clock.0.lock().unwrap() = t(160);
        assert_eq!(watches.live(), Ok(()));
        *clock.0.lock().unwrap() = t(161);
        let err = watches.live().unwrap_err();
        assert!(err.contains("keyrotation") && err.contains("Secret (clinical)") && err.contains("no answer"), "{err}");
        assert!(!watches.all_synced(), "silent for twice a request's timeout: not ready");
        watches.answered("/api/v1/namespaces/clinical/secrets");
        assert_eq!(watches.live(), Ok(()));
        assert!(watches.all_synced());
        *clock.0.lock().unwrap() = t(181);
        assert!(!watches.all_synced(), "the Deployment watch was last heard at 100, 81 s ago");
        watches.answered("/apis/apps/v1/deployments");
        assert!(watches.all_synced());

        // A restart is counted in the metrics.
        b.observe::<()>(&Err(watcher::Error::NoResourceVersion));
        assert!(!watches.all_synced());
        b.observe::<()>(&Ok(watcher::Event::Init));
        b.observe::<()>(&Ok(watcher::Event::InitDone));
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"fhir_operator_watch_restarts_total{controller="keyrotation",kind="Secret",scope="clinical"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"fhir_operator_watch_synced{controller="fhirendpoint",kind="Deployment",scope=""} 1"#));
    }

    #[test]
    fn only_watch_requests_are_answers() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            watch_path(&uri("/api/v1/secrets?&watch=true&timeoutSeconds=40&resourceVersion=5")).as_deref(),
            Some("/api/v1/secrets")
        );
        assert_eq!(watch_path(&uri("/api/v1/secrets?limit=100")), None);
        assert_eq!(watch_path(&uri("/api/v1/secrets")), None);
        assert_eq!(watch_path(&uri("/api/v1/secrets?watchful=true")), None);
    }
}
