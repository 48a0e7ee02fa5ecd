//! Leader election on a `coordination.k8s.io/v1` Lease (the
//! `kube-lease-manager` crate: server-side apply on the Lease, so two
//! candidates never both hold it). Only the leader runs the controllers; a
//! standby waits, ready to take over when the leader's lease expires (or at
//! once when the leader releases it on SIGTERM).

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Where the Lease is and how long it lasts.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This candidate's identity (the pod name in a cluster).
    pub identity: String,
    /// How long the lease stays valid after its last renewal: the longest a
    /// standby waits after the leader dies.
    pub duration: Duration,
}

impl LeaseSettings {
    /// Renew this long before the lease expires; also the clock skew
    /// between nodes that the election tolerates.
    fn grace(&self) -> u64 {
        (self.duration.as_secs() / 3).clamp(1, 5)
    }
}

/// Campaigning for (and then holding) the lease.
pub struct Candidate {
    leading: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    settings: LeaseSettings,
}

impl Candidate {
    /// Starts campaigning: renews while holding, retries while not.
    pub async fn start(client: Client, settings: LeaseSettings) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, &settings.name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(settings.duration.as_secs().max(2))
            .with_grace(settings.grace())
            .with_field_manager(format!("fhir-operator/leader/{}", settings.identity))
            .build()
            .await?;
        let (leading, task) = manager.watch().await;
        Ok(Self { leading, task, settings })
    }

    /// Completes once this candidate holds the lease.
    pub async fn acquired(&mut self) {
        if self.leading.wait_for(|leading| *leading).await.is_err() {
            // The election task ended: it never leads.
            std::future::pending::<()>().await;
        }
        info!(lease = %self.settings.name, namespace = %self.settings.namespace, identity = %self.settings.identity, "became the leader");
    }

    /// Completes if this candidate, having led, loses the lease.
    pub async fn lost(&mut self) {
        if self.leading.wait_for(|leading| !*leading).await.is_ok() {
            warn!(lease = %self.settings.name, "lost the lease");
        } else {
            warn!(lease = %self.settings.name, "the leader election stopped");
        }
    }

    /// Releases the lease (if held): no holder, so a standby takes it at its
    /// next check instead of waiting for it to expire unrenewed.
    pub async fn release(self) {
        drop(self.leading);
        match self.task.await {
            Ok(Ok(_)) => info!(lease = %self.settings.name, "released the lease"),
            Ok(Err(e)) => warn!(error = %e, "releasing the lease"),
            Err(e) => warn!(error = %e, "the leader election task failed"),
        }
    }
}
