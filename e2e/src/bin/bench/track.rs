//! Watches the children of one namespace and remembers, for each, a
//! signature of the content the scenarios compare and when it last changed:
//! "every child exists with the expected content" is then a lookup, timed
//! by the watch event that made it true, not by a polling interval.
//!
//! One watch per kind, in this process, for every arm of a scenario alike.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fhir_operator::fhirendpoint::build::{Children, TLS_HASH_ANNOTATION};
use fhir_operator::meta::hash_of;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;

/// (kind, name).
pub type Key = (&'static str, String);

#[derive(Clone, Debug)]
pub struct Seen {
    pub signature: String,
    pub at: Instant,
}

/// What a scenario waits for: each key with the signature it must have
/// (`None`: it exists).
pub type Targets = Vec<(Key, Option<String>)>;

pub struct Tracker {
    state: Arc<Mutex<HashMap<Key, Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the scenarios compare in a ConfigMap: its data.
pub fn config_map_signature(cm: &ConfigMap) -> String {
    hash_of(&cm.data)
}

/// A container's name, image and environment (name, value).
type ContainerContent = (String, Option<String>, Vec<(String, Option<String>)>);

/// What they compare in a Deployment: the pod template's annotations (the
/// config and keys hashes) but the TLS one (each issuer's certificate
/// differs), and each container's image and environment.
pub fn deployment_signature(d: &Deployment) -> String {
    let Some(template) = d.spec.as_ref().map(|s| &s.template) else { return String::new() };
    let mut annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    annotations.remove(TLS_HASH_ANNOTATION);
    let containers: Vec<ContainerContent> = template
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            let env = c.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone())).collect();
            (c.name.clone(), c.image.clone(), env)
        })
        .collect();
    hash_of(&(annotations, containers))
}

/// Every child of one endpoint, with the content of its ConfigMap and
/// Deployment; the TLS Secret too when `with_secret`.
pub fn targets(children: &Children, with_secret: bool) -> Targets {
    let name = |m: &kube::api::ObjectMeta| m.name.clone().unwrap_or_default();
    let mut out: Targets = vec![
        (("ServiceAccount", name(&children.service_account.metadata)), None),
        (("ConfigMap", name(&children.gateway_config.metadata)), Some(config_map_signature(&children.gateway_config))),
        (("Deployment", name(&children.deployment.metadata)), Some(deployment_signature(&children.deployment))),
        (("Service", name(&children.service.metadata)), None),
        (("NetworkPolicy", name(&children.network_policy.metadata)), None),
    ];
    if with_secret {
        let endpoint = name(&children.deployment.metadata);
        out.push((("Secret", fhir_operator::fhirendpoint::build::self_issued_tls_name(&endpoint)), None));
    }
    out
}

/// The ConfigMap and Deployment targets only (what a tier edit changes).
pub fn config_targets(children: &Children) -> Targets {
    targets(children, false).into_iter().filter(|(_, s)| s.is_some()).collect()
}

impl Tracker {
    /// Starts the watches of `ns` and waits until each has listed.
    pub async fn start(client: &Client, ns: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        let (synced_tx, mut synced_rx) = tokio::sync::mpsc::channel(8);
        macro_rules! watch {
            ($kind:ty, $name:literal, $sig:expr) => {
                tasks.push(spawn_watch::<$kind>(
                    Api::namespaced(client.clone(), ns),
                    $name,
                    $sig,
                    state.clone(),
                    synced_tx.clone(),
                ))
            };
        }
        watch!(ServiceAccount, "ServiceAccount", |_| String::new());
        watch!(ConfigMap, "ConfigMap", config_map_signature);
        watch!(Deployment, "Deployment", deployment_signature);
        watch!(Service, "Service", |_| String::new());
        watch!(NetworkPolicy, "NetworkPolicy", |_| String::new());
        watch!(Secret, "Secret", |_| String::new());
        for _ in 0..tasks.len() {
            tokio::time::timeout(Duration::from_secs(60), synced_rx.recv()).await?;
        }
        Ok(Self { state, tasks })
    }

    pub fn get(&self, key: &Key) -> Option<Seen> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    /// How many of `targets` are not met now, and one of them.
    pub fn unmet(&self, targets: &Targets) -> (usize, Option<Key>) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut missing = targets.iter().filter(|(key, want)| match (state.get(key), want) {
            (None, _) => true,
            (Some(seen), Some(want)) => &seen.signature != want,
            (Some(_), None) => false,
        });
        let first = missing.next().map(|(k, _)| k.clone());
        (first.iter().count() + missing.count(), first)
    }

    /// Waits until every target is met; returns when the last one became
    /// true (the watch event's arrival), not when this noticed it.
    pub async fn wait(&self, what: &str, targets: &Targets, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let (unmet, example) = self.unmet(targets);
            if unmet == 0 {
                let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                return Ok(targets.iter().filter_map(|(k, _)| state.get(k).map(|s| s.at)).max().unwrap_or(deadline));
            }
            if Instant::now() > deadline {
                bail!("{what}: {unmet} children not as expected within {timeout:?}, e.g. {example:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    kind: &'static str,
    signature: fn(&K) -> String,
    state: Arc<Mutex<HashMap<Key, Seen>>>,
    synced: tokio::sync::mpsc::Sender<()>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default().page_size(500)).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let Ok(event) = event else { continue };
            let objects = match event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => vec![o],
                watcher::Event::InitDone => {
                    let _ = synced.send(()).await;
                    continue;
                }
                watcher::Event::Init | watcher::Event::Delete(_) => continue,
            };
            let now = Instant::now();
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            for o in objects {
                let sig = signature(&o);
                let key = (kind, o.name_any());
                // Only a change of signature moves the time: a later write
                // of the same content is not when it became true.
                match state.get(&key) {
                    Some(seen) if seen.signature == sig => {}
                    _ => {
                        state.insert(key, Seen { signature: sig, at: now });
                    }
                }
            }
        }
    })
}
