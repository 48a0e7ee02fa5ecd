//! The RateLimitTier controller: checks that a tier is something the gateway
//! can enforce, and lists in its status the FhirEndpoints that use it.
//! Endpoints re-render their gateway when their tier changes (the
//! FhirEndpoint controller watches tiers).

use std::sync::Arc;
use std::time::Duration;

use futures::{Future, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tracing::{instrument, warn};

use crate::api::{
    FhirEndpoint, ObjectRef as StatusRef, RateLimitTier, RateLimitTierSpec, RateLimitTierStatus, condition, reason,
};
use crate::apply::{NoSharedBackoff, apply_status};
use crate::caches::Caches;
use crate::conditions::{self, Clock, Desired};
use crate::fhirendpoint::build::{limits_from_tier, quantity_bytes};
use crate::fhirendpoint::gateway::{self, GatewayError, Limits};
use crate::fhirendpoint::pod::gateway_settings;
use crate::fhirendpoint::validate::InvalidSpec;
use crate::health::Watches;
use crate::metrics::SharedMetrics;

pub const FIELD_MANAGER: &str = "fhir-operator/ratelimittier";
pub const CONTROLLER: &str = "ratelimittier";
/// At most this many endpoints are named in a tier's status.
pub const MAX_LISTED_ENDPOINTS: usize = 50;

/// The gateway limits of a tier, or what makes it inexpressible. The schema
/// refuses most of that (rates below 1, negative bursts, malformed sizes);
/// what it cannot see (a size that overflows, anything nginx would refuse)
/// is caught here, with the field named.
pub fn validate(spec: &RateLimitTierSpec) -> Result<Limits, InvalidSpec> {
    let invalid = |field: &str, message: String| InvalidSpec { field: field.to_owned(), message };
    let rates = [
        ("spec", Some((spec.requests_per_second, spec.burst))),
        ("spec.read", spec.read.as_ref().map(|l| (l.requests_per_second, l.burst))),
        ("spec.write", spec.write.as_ref().map(|l| (l.requests_per_second, l.burst))),
    ];
    for (field, rate) in rates {
        let Some((rps, burst)) = rate else { continue };
        if rps < 1 {
            return Err(invalid(
                &format!("{field}.requestsPerSecond"),
                format!("{rps}: at least 1 request per second"),
            ));
        }
        if burst < 0 {
            return Err(invalid(&format!("{field}.burst"), format!("{burst}: a burst cannot be negative")));
        }
    }
    match quantity_bytes(&spec.max_request_body_size) {
        Some(0) | None => {
            return Err(invalid(
                "spec.maxRequestBodySize",
                format!(
                    "{:?} is not a size in bytes the gateway can enforce (e.g. 512Ki, 10Mi)",
                    spec.max_request_body_size
                ),
            ));
        }
        Some(_) => {}
    }
    let limits = limits_from_tier(spec);
    // The gateway itself is the last judge of what it can express.
    gateway::nginx_conf(&gateway_settings(limits.clone())).map_err(|e| {
        let field = match &e {
            GatewayError::InvalidSetting { field, .. } if field.starts_with("limits.read") => "spec.read",
            GatewayError::InvalidSetting { field, .. } if field.starts_with("limits.write") => "spec.write",
            GatewayError::InvalidSetting { field, .. } if field.contains("body") => "spec.maxRequestBodySize",
            _ => "spec",
        };
        invalid(field, e.to_string())
    })?;
    Ok(limits)
}

/// Shared by every reconcile of tiers.
pub struct Context {
    pub client: Client,
    /// FhirEndpoints, one cache per watched scope.
    pub endpoints: Vec<Store<FhirEndpoint>>,
    pub clock: Arc<dyn Clock>,
    pub metrics: SharedMetrics,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing status: {0}")]
    Status(#[source] kube::Error),
}

/// The endpoints (sorted) that name `tier`.
fn users(stores: &[Store<FhirEndpoint>], tier: &str) -> Vec<StatusRef> {
    let mut found: Vec<StatusRef> = stores
        .iter()
        .flat_map(|s| s.state())
        .filter(|ep| ep.spec.rate_limit.as_ref().is_some_and(|r| r.tier == tier))
        .map(|ep| StatusRef {
            kind: "FhirEndpoint".into(),
            namespace: ep.namespace().unwrap_or_default(),
            name: ep.name_any(),
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The status a tier should have.
pub fn desired_status(tier: &RateLimitTier, users: Vec<StatusRef>, now: Timestamp) -> RateLimitTierStatus {
    let mut status = tier.status.clone().unwrap_or_default();
    let generation = tier.metadata.generation;
    status.observed_generation = generation;
    status.endpoint_count = users.len() as i32;
    status.endpoints = users.into_iter().take(MAX_LISTED_ENDPOINTS).collect();
    let ready = match validate(&tier.spec) {
        Ok(_) => Desired::new(condition::READY, true, "Valid", "the gateway enforces this tier"),
        Err(e) => Desired::new(condition::READY, false, reason::INVALID_SPEC, e.to_string()),
    };
    conditions::set(&mut status.conditions, ready, generation, now);
    status
}

#[instrument(skip_all, fields(kind = "RateLimitTier", name = %tier.name_any(), generation = tier.metadata.generation.unwrap_or_default()))]
async fn reconcile(tier: Arc<RateLimitTier>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let status = desired_status(&tier, users(&ctx.endpoints, &tier.name_any()), ctx.clock.now());
    let result = if tier.status.as_ref() == Some(&status) {
        Ok(())
    } else {
        let api: Api<RateLimitTier> = Api::all(ctx.client.clone());
        apply_status(&api, &tier.name_any(), &status, FIELD_MANAGER).await.map_err(Error::Status)
    };
    ctx.metrics.observe(CONTROLLER, started.elapsed());
    result.map(|()| Action::await_change())
}

fn error_policy(tier: Arc<RateLimitTier>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(CONTROLLER, "status");
    warn!(name = tier.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// Sets up the tier controller, subscribing to `caches`; the future runs it
/// until `shutdown` completes. `scopes` are the watched namespaces (`None`:
/// all).
pub fn run(
    client: Client,
    scopes: Vec<Option<String>>,
    clock: Arc<dyn Clock>,
    metrics: SharedMetrics,
    watches: Watches,
    caches: &Caches,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let (tiers, tier_stream) =
        caches.related(Api::<RateLimitTier>::all(client.clone()), &watches.controller(CONTROLLER, None));
    let mut controller = Controller::for_shared_stream(tier_stream, tiers.clone()).trigger_backoff(NoSharedBackoff);
    let mut endpoints = Vec::new();
    for scope in &scopes {
        let api: Api<FhirEndpoint> = match scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (store, stream) = caches.related(api, &watches.controller(CONTROLLER, scope.as_deref()));
        endpoints.push(store);
        let tiers = tiers.clone();
        // Tiers are few: an endpoint event re-checks every tier, so the one
        // an endpoint just left is updated too.
        controller = controller.watches_shared_stream(stream, move |_: Arc<FhirEndpoint>| {
            tiers.state().iter().map(|t| ObjectRef::from_obj(t.as_ref())).collect::<Vec<_>>()
        });
    }
    let context = Arc::new(Context { client, endpoints, clock, metrics });
    controller.graceful_shutdown_on(shutdown).run(reconcile, error_policy, context).for_each(|result| async move {
        if let Err(e) = result {
            warn!(error = %e, "tier controller event");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MethodLimit;
    use serde_json::json;

    fn tier(spec: RateLimitTierSpec) -> RateLimitTier {
        let mut t = RateLimitTier::new("gold", spec);
        t.metadata.generation = Some(3);
        t
    }

    fn gold() -> RateLimitTierSpec {
        serde_json::from_value(
            json!({"requestsPerSecond": 100, "burst": 50, "write": {"requestsPerSecond": 20, "burst": 10},
            "maxRequestBodySize": "10Mi"}),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_tier_becomes_gateway_limits() {
        let limits = validate(&gold()).unwrap();
        assert_eq!(limits.default, gateway::Rate { per_second: 100, burst: 50 });
        assert_eq!(limits.write, Some(gateway::Rate { per_second: 20, burst: 10 }));
        assert_eq!(limits.max_body_bytes, 10 << 20);
    }

    #[test]
    fn inexpressible_tiers_are_refused_naming_the_field() {
        let cases: Vec<(&str, RateLimitTierSpec)> = vec![
            ("spec.requestsPerSecond", RateLimitTierSpec { requests_per_second: 0, ..gold() }),
            ("spec.burst", RateLimitTierSpec { burst: -1, ..gold() }),
            (
                "spec.write.requestsPerSecond",
                RateLimitTierSpec { write: Some(MethodLimit { requests_per_second: 0, burst: 1 }), ..gold() },
            ),
            (
                "spec.read.burst",
                RateLimitTierSpec { read: Some(MethodLimit { requests_per_second: 5, burst: -3 }), ..gold() },
            ),
            (
                "spec.maxRequestBodySize",
                RateLimitTierSpec { max_request_body_size: "99999999999999Gi".into(), ..gold() },
            ),
            ("spec.maxRequestBodySize", RateLimitTierSpec { max_request_body_size: "0".into(), ..gold() }),
        ];
        for (field, spec) in cases {
            let err = validate(&spec).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn status_lists_users_bounded_and_says_whether_the_tier_is_valid() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let users: Vec<StatusRef> = (0..60)
            .map(|i| StatusRef { kind: "FhirEndpoint".into(), namespace: "clinic".into(), name: format!("ep-{i:02}") })
            .collect();
        let status = desired_status(&tier(gold()), users, now);
        assert_eq!(status.endpoint_count, 60);
        assert_eq!(status.endpoints.len(), MAX_LISTED_ENDPOINTS);
        assert_eq!(status.observed_generation, Some(3));
        assert!(conditions::is_true(&status.conditions, condition::READY));

        let bad = tier(RateLimitTierSpec { max_request_body_size: "99999999999999Gi".into(), ..gold() });
        let status = desired_status(&bad, Vec::new(), now);
        let ready = &status.conditions[0];
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidSpec"));
        assert!(ready.message.starts_with("spec.maxRequestBodySize"), "{}", ready.message);
    }
}
