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
use crate::conditions::SystemClock;
use crate::discovery;
use crate::fhirendpoint::build::Images;
use crate::fhirendpoint::controller::{self, Settings, Shared};
use crate::fhirendpoint::reconcile::FIELD_MANAGER;
use crate::metrics::Metrics;
use crate::server::{self, Readiness};

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
    /// How often to rediscover optional APIs (monitoring, PDB), e.g. `5m`.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub discovery_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no Kubernetes client configuration (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Client(#[source] kube::Error),
    #[error("discovering the cluster's APIs: {0}")]
    Discovery(#[source] kube::Error),
    #[error("serving metrics on {addr}: {source}")]
    Serve { addr: SocketAddr, source: std::io::Error },
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
    let client = Client::try_default().await.map_err(RunError::Client)?;
    let capabilities = discovery::discover(&client).await.map_err(RunError::Discovery)?;
    info!(?capabilities, version = env!("CARGO_PKG_VERSION"), "fhir-operator starting");

    let metrics = Arc::new(Metrics::default());
    let readiness = Readiness::default();
    let shutdown = shutdown_signal().boxed().shared();
    let shared = Shared {
        client: client.clone(),
        applier: Applier::new(client.clone(), FIELD_MANAGER),
        clock: Arc::new(SystemClock),
        metrics: metrics.clone(),
        capabilities: Arc::new(RwLock::new(capabilities)),
    };
    let settings = Settings {
        namespaces: (!args.namespaces.is_empty()).then(|| args.namespaces.clone()),
        images: Images { gateway: args.gateway_image.clone(), metrics: args.sidecar_image.clone() },
        concurrency: args.concurrency,
        discovery_interval: args.discovery_interval,
        instance: std::env::var("POD_NAME").ok(),
    };
    let scopes: Vec<Option<String>> = match &settings.namespaces {
        None => vec![None],
        Some(list) => list.iter().cloned().map(Some).collect(),
    };
    // Two controllers per scope (endpoints, key schedules); ready once
    // every one of them has filled its caches.
    let pending = Arc::new(AtomicUsize::new(2 * scopes.len()));
    let ready = || {
        let (pending, readiness) = (pending.clone(), readiness.clone());
        move || {
            if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                readiness.set(true);
                info!("ready");
            }
        }
    };
    let mut controllers: Vec<futures::future::BoxFuture<'static, ()>> = Vec::new();
    for scope in scopes {
        controllers.push(
            controller::run_scope(shared.clone(), settings.clone(), scope.clone(), shutdown.clone(), ready()).boxed(),
        );
        controllers.push(
            crate::keyrotation::controller::run_scope(
                shared.client.clone(),
                shared.clock.clone(),
                shared.metrics.clone(),
                scope,
                settings.instance.clone(),
                shutdown.clone(),
                ready(),
            )
            .boxed(),
        );
    }
    let tiers = crate::ratelimittier::run(
        shared.client.clone(),
        match &settings.namespaces {
            None => vec![None],
            Some(list) => list.iter().cloned().map(Some).collect(),
        },
        shared.clock.clone(),
        shared.metrics.clone(),
        shutdown.clone(),
    );
    let refresh = controller::refresh_capabilities(client, shared.capabilities.clone(), args.discovery_interval);
    let serve = server::serve(args.metrics_addr, metrics, readiness, shutdown.clone());
    tokio::select! {
        result = serve => result.map_err(|source| RunError::Serve { addr: args.metrics_addr, source })?,
        _ = future::join(future::join_all(controllers), tiers) => {}
        _ = refresh => {}
    }
    info!("stopped");
    Ok(())
}
