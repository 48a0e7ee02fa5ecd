//! `fhir-operator run`: the controllers, `/metrics`, `/healthz`, `/readyz`,
//! JSON logs; stops cleanly on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::{self, FutureExt};
use kube::Client;
use tracing::info;

use crate::apply::Applier;
use crate::backup::job::JobImages;
use crate::caches::Caches;
use crate::conditions::FastClock;
use crate::conditions::SystemClock;
use crate::discovery;
use crate::fhirendpoint::auth::KeyHints;
use crate::fhirendpoint::build::Images;
use crate::fhirendpoint::controller::{self, Settings, Shared};
use crate::fhirendpoint::reconcile::FIELD_MANAGER;
use crate::health::Watches;
use crate::leader::{Candidate, LeaseSettings};
use crate::metrics::Metrics;
use crate::server::{self, Readiness, Ready};

/// Arguments of `fhir-operator run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch only these namespaces (repeat, or comma-separated). Default: all.
    #[arg(long = "namespace", value_delimiter = ',', env = "FHIR_OPERATOR_NAMESPACES")]
    pub namespaces: Vec<String>,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FHIR_OPERATOR_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Reconciles running at once (per watched namespace).
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// nginx image of the gateway.
    #[arg(long, env = "FHIR_OPERATOR_GATEWAY_IMAGE", default_value_t = Images::default().gateway)]
    pub gateway_image: String,
    /// Image of the gateway-metrics sidecar (the operator's own image).
    #[arg(long, env = "FHIR_OPERATOR_IMAGE", default_value_t = Images::default().metrics)]
    pub sidecar_image: String,
    /// PEM CA certificates trusted, besides the system's, when fetching
    /// token issuers' JWKS URLs (`spec.auth.oauth.issuers[].jwks.uri`).
    #[arg(long, value_name = "FILE", env = "FHIR_OPERATOR_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<std::path::PathBuf>,
    /// Where to listen for the gateways' reports of tokens signed with a
    /// key they do not know (e.g. `0.0.0.0:8081`), so that the issuer's
    /// JWKS URL is fetched at once. Unset: keys refresh on schedule only.
    #[arg(long, value_name = "ADDR", env = "FHIR_OPERATOR_KEY_HINTS_ADDR", requires = "key_hints_url")]
    pub key_hints_addr: Option<SocketAddr>,
    /// The URL the gateways call for those reports: a Service in front of
    /// `--key-hints-addr`, on the same port.
    #[arg(long, value_name = "URL", env = "FHIR_OPERATOR_KEY_HINTS_URL", requires = "key_hints_addr")]
    pub key_hints_url: Option<url::Url>,
    /// Labels of the operator's pods (`k=v`, repeat or comma-separated):
    /// the gateways' NetworkPolicy then lets them reach the hint port of
    /// these pods in the operator's namespace (`POD_NAMESPACE`) only.
    /// Unset: the hint port on any address (an operator outside the cluster).
    #[arg(long, value_delimiter = ',', env = "FHIR_OPERATOR_POD_LABELS")]
    pub operator_pod_labels: Vec<String>,
    /// Run the controllers only while holding a Lease, so that of several
    /// replicas one reconciles at a time. `--leader-elect=false` for a
    /// single process that needs no Lease.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "FHIR_OPERATOR_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the `coordination.k8s.io/v1` Lease.
    #[arg(long, default_value = "fhir-operator", env = "FHIR_OPERATOR_LEASE_NAME")]
    pub lease_name: String,
    /// Namespace of the Lease. Default: the pod's (`POD_NAMESPACE`), or the
    /// kubeconfig's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long the Lease stays valid without renewal: the longest a standby
    /// waits after the leader dies or releases the Lease on SIGTERM.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// PostgreSQL image of the backup and restore drill Jobs (pg_dump,
    /// pg_restore, a scratch server): its major version must be at least
    /// the databases' (pg_dump refuses newer servers).
    #[arg(long, env = "FHIR_OPERATOR_POSTGRES_IMAGE", default_value = "postgres:15")]
    pub postgres_image: String,
    /// Testing only: the backup controller's clock runs this many times
    /// faster than real time from --backup-clock-origin, so that cron slots
    /// minutes apart come seconds apart.
    #[arg(long, hide = true, requires = "backup_clock_origin")]
    pub backup_clock_rate: Option<u32>,
    /// Testing only: where the fast backup clock equals real time.
    #[arg(long, hide = true)]
    pub backup_clock_origin: Option<k8s_openapi::jiff::Timestamp>,
    /// How long a watch may stay out of sync, or without an answer from
    /// the API server, before `/healthz` fails (and the kubelet restarts
    /// the process). Each watch request ends after a third of this.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, env = "FHIR_OPERATOR_WATCH_STALL_LIMIT")]
    pub watch_stall_limit: Duration,
    /// How often to rediscover optional APIs (monitoring, PDB), e.g. `5m`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub discovery_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("leader election: {0}")]
    Lease(#[source] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease; stopping so that only one replica reconciles")]
    LostLease,
    #[error("no Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Client(#[source] kube::Error),
    #[error("discovering the cluster's APIs: {0}")]
    Discovery(#[source] kube::Error),
    #[error("serving metrics on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Jwks(String),
    #[error("{0}")]
    Args(String),
}

/// `--key-hints-*` and `--operator-pod-labels`, checked.
fn key_hints(args: &RunArgs) -> Result<Option<KeyHints>, RunError> {
    let (Some(addr), Some(url)) = (args.key_hints_addr, &args.key_hints_url) else { return Ok(None) };
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(RunError::Args(format!("--key-hints-url {url}: needs an http or https URL with a host")));
    }
    let operator_pods = if args.operator_pod_labels.is_empty() {
        None
    } else {
        let mut labels = std::collections::BTreeMap::new();
        for pair in &args.operator_pod_labels {
            let (k, v) = pair
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| RunError::Args(format!("--operator-pod-labels {pair:?}: expected key=value")))?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        let namespace = std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()).ok_or_else(|| {
            RunError::Args("--operator-pod-labels needs POD_NAMESPACE (the operator's namespace)".into())
        })?;
        Some((namespace, labels))
    };
    Ok(Some(KeyHints { url: url.clone(), port: addr.port(), operator_pods }))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
    }
}

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    crate::telemetry::init();
    let metrics = Arc::new(Metrics::default());
    let watches = Watches::new(Arc::new(SystemClock), args.watch_stall_limit, metrics.clone());
    let client = client(&watches).await?;
    let capabilities = discovery::discover(&client).await.map_err(RunError::Discovery)?;
    info!(?capabilities, version = env!("CARGO_PKG_VERSION"), "fhir-operator starting");

    let key_hints = key_hints(&args)?;
    let readiness = Readiness::default();
    let shutdown = shutdown_signal().boxed().shared();
    let mut server = tokio::spawn(server::serve(
        args.metrics_addr,
        metrics.clone(),
        readiness.clone(),
        watches.clone(),
        shutdown.clone(),
    ));
    let shared = Shared {
        client: client.clone(),
        applier: Applier::new(client.clone(), FIELD_MANAGER),
        clock: Arc::new(SystemClock),
        metrics: metrics.clone(),
        capabilities: Arc::new(RwLock::new(capabilities)),
        watches,
    };
    let settings = Settings {
        namespaces: (!args.namespaces.is_empty()).then(|| args.namespaces.clone()),
        images: Images { gateway: args.gateway_image.clone(), metrics: args.sidecar_image.clone() },
        concurrency: args.concurrency,
        discovery_interval: args.discovery_interval,
        instance: std::env::var("POD_NAME").ok(),
        backup_images: JobImages { agent: args.sidecar_image.clone(), postgres: args.postgres_image.clone() },
        jwks: Arc::new(
            crate::fhirendpoint::jwks::JwksCache::new(args.jwks_ca_file.as_deref()).map_err(RunError::Jwks)?,
        ),
        key_hints: key_hints.clone(),
        backup_clock: match (args.backup_clock_rate, args.backup_clock_origin) {
            (Some(rate), Some(origin)) => Arc::new(FastClock { origin, rate }),
            _ => Arc::new(SystemClock),
        },
    };

    let hints_server = match args.key_hints_addr {
        Some(addr) if key_hints.is_some() => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|source| RunError::Serve { addr, source })?;
            info!(%addr, "listening for the gateways' key hints");
            let serve = crate::fhirendpoint::jwks::serve_hints(listener, settings.jwks.clone(), shutdown.clone());
            Some(tokio::spawn(serve))
        }
        _ => None,
    };
    let work = async {
        let mut candidate = None;
        if args.leader_elect {
            let lease = LeaseSettings {
                name: args.lease_name.clone(),
                namespace: args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_owned()),
                identity: identity(),
                duration: args.lease_duration,
            };
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "waiting for the lease");
            let mut c = Candidate::start(client.clone(), lease).await.map_err(RunError::Lease)?;
            readiness.set(Ready::Standby);
            tokio::select! {
                _ = c.acquired() => {}
                _ = shutdown.clone() => {
                    c.release().await;
                    return Ok(());
                }
            }
            candidate = Some(c);
        }
        readiness.set(Ready::No);
        metrics.leader.set(1);
        let controllers = controllers(&shared, &settings, shutdown.clone(), &readiness);
        match candidate {
            None => controllers.await,
            Some(mut c) => {
                tokio::select! {
                    _ = controllers => c.release().await,
                    // Another replica may be reconciling now: stop at once,
                    // the kubelet restarts this one as a standby.
                    _ = c.lost() => return Err(RunError::LostLease),
                }
            }
        }
        Ok(())
    };
    tokio::pin!(work);
    tokio::select! {
        served = &mut server => {
            // The server stops on SIGTERM or SIGINT (or fails to start):
            // let the controllers stop too, and the lease be released.
            served_result(served, args.metrics_addr)?;
            (&mut work).await?;
        }
        result = &mut work => {
            result?;
            served_result(server.await, args.metrics_addr)?;
        }
    }
    if let Some(hints) = hints_server {
        hints.abort();
    }
    info!("stopped");
    Ok(())
}

/// The operator's client: a read timeout, so that no request waits forever
/// on a connection that hangs, and the layer that reports answered watch
/// requests to the watches' health.
async fn client(watches: &Watches) -> Result<Client, RunError> {
    let mut config = kube::Config::infer().await.map_err(|e| RunError::Client(kube::Error::InferConfig(e)))?;
    config.read_timeout = Some(watches.read_timeout());
    config.reset_reader_on_write = true;
    let builder = kube::client::ClientBuilder::try_from(config).map_err(RunError::Client)?;
    Ok(builder.with_layer(&watches.layer()).build())
}

fn served_result(
    served: Result<std::io::Result<()>, tokio::task::JoinError>,
    addr: SocketAddr,
) -> Result<(), RunError> {
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(RunError::Serve { addr, source }),
        Err(e) => Err(RunError::Serve { addr, source: std::io::Error::other(e) }),
    }
}

/// This process's identity in the election: the pod name in a cluster,
/// otherwise host name and process id.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        format!("{}-{}", if host.is_empty() { "fhir-operator" } else { host }, std::process::id())
    })
}

/// Every controller of every scope, until `shutdown`; `readiness` turns
/// ready once all of their caches are filled.
async fn controllers(
    shared: &Shared,
    settings: &Settings,
    shutdown: future::Shared<future::BoxFuture<'static, ()>>,
    readiness: &Readiness,
) {
    let scopes: Vec<Option<String>> = match &settings.namespaces {
        None => vec![None],
        Some(list) => list.iter().cloned().map(Some).collect(),
    };
    // Three controllers per scope (endpoints, key schedules, backup
    // policies); ready once every one of them has filled its caches.
    let pending = Arc::new(AtomicUsize::new(3 * scopes.len()));
    let ready = || {
        let (pending, readiness) = (pending.clone(), readiness.clone());
        move || {
            if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                readiness.set(Ready::Yes);
                info!("ready");
            }
        }
    };
    // Every controller subscribes to the shared watches while it is set
    // up; the watches start once all have.
    let caches = Caches::default();
    let mut running: Vec<future::BoxFuture<'static, ()>> = Vec::new();
    for scope in scopes.clone() {
        running.push(
            controller::run_scope(shared.clone(), settings.clone(), scope.clone(), &caches, shutdown.clone(), ready())
                .boxed(),
        );
        running.push(
            crate::backup::controller::run_scope(
                shared.client.clone(),
                settings.backup_clock.clone(),
                shared.metrics.clone(),
                shared.watches.clone(),
                settings.backup_images.clone(),
                scope.clone(),
                settings.instance.clone(),
                &caches,
                shutdown.clone(),
                ready(),
            )
            .boxed(),
        );
        running.push(
            crate::keyrotation::controller::run_scope(
                shared.client.clone(),
                shared.clock.clone(),
                shared.metrics.clone(),
                shared.watches.clone(),
                scope,
                settings.instance.clone(),
                &caches,
                shutdown.clone(),
                ready(),
            )
            .boxed(),
        );
    }
    let tiers = crate::ratelimittier::run(
        shared.client.clone(),
        scopes,
        shared.clock.clone(),
        shared.metrics.clone(),
        shared.watches.clone(),
        &caches,
        shutdown.clone(),
    );
    let _watching = caches.start();
    let refresh = controller::refresh_capabilities(
        shared.client.clone(),
        shared.capabilities.clone(),
        settings.discovery_interval,
    );
    tokio::select! {
        _ = future::join(future::join_all(running), tiers) => {}
        _ = refresh => {}
    }
}
