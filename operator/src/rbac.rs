//! The operator's RBAC: one list of rules, each with the code path that
//! needs it. The Helm chart renders its ClusterRole from this list and the
//! e2e tests run the operator with exactly these rules, so a missing or an
//! extra verb shows.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// One RBAC rule and why the operator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub api_group: &'static str,
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub why: &'static str,
}

const READ: &[&str] = &["get", "list", "watch"];
/// Server-side apply creates with PATCH, which still needs `create`.
const OWN: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

pub const RULES: &[Rule] = &[
    Rule {
        api_group: "fhiroperator.io",
        resources: &["fhirendpoints", "keyrotationschedules", "ratelimittiers", "backuppolicies"],
        verbs: READ,
        why: "controllers watch every kind they reconcile or dereference (apply.rs caches, controller.rs)",
    },
    Rule {
        api_group: "fhiroperator.io",
        resources: &[
            "fhirendpoints/status",
            "ratelimittiers/status",
            "keyrotationschedules/status",
            "backuppolicies/status",
        ],
        verbs: &["patch"],
        why: "fhirendpoint::reconcile::write_status, ratelimittier::reconcile, \
              keyrotation::controller::write_status and backup::controller::write_status apply the status \
              subresource",
    },
    Rule {
        api_group: "",
        resources: &["serviceaccounts", "configmaps", "services"],
        verbs: OWN,
        why: "FhirEndpoint children (build.rs) and the JWKS ConfigMaps of ecdsa-p256 key schedules \
              (keyrotation/controller.rs); delete: children no longer desired",
    },
    Rule {
        api_group: "",
        resources: &["secrets"],
        verbs: OWN,
        why: "self-issued TLS Secrets (tls.rs) and key schedule Secrets (keyrotation/controller.rs); \
              get: the user's TLS and database-credential Secrets by name, and a key schedule's own Secret \
              (its keys are read live, never cached); list/watch: the cache of operator-managed Secrets \
              (label-filtered, data dropped from the cache)",
    },
    Rule { api_group: "apps", resources: &["deployments"], verbs: OWN, why: "the endpoint's Deployment (pod.rs)" },
    Rule {
        api_group: "batch",
        resources: &["jobs"],
        verbs: &["get", "list", "watch", "create", "delete"],
        why: "backup and restore drill Jobs (backup/job.rs): created once per slot, deleted once their result \
              is in status (backup/controller.rs); audit verification Jobs of a PersistentVolumeClaim trail \
              (fhirendpoint/audit_job.rs): get/create one per sealEvery period, list/delete the superseded ones \
              (fhirendpoint::audit_check::check_by_job)",
    },
    Rule {
        api_group: "",
        resources: &["pods"],
        verbs: &["list"],
        why: "a finished backup or audit verification Job's result is its pod's termination message \
              (backup::controller::job_views, fhirendpoint::audit_check::check_by_job)",
    },
    Rule {
        api_group: "networking.k8s.io",
        resources: &["networkpolicies"],
        verbs: OWN,
        why: "the endpoint's default-deny NetworkPolicy (network.rs)",
    },
    Rule {
        api_group: "policy",
        resources: &["poddisruptionbudgets"],
        verbs: OWN,
        why: "PodDisruptionBudget for endpoints with more than one replica (build.rs)",
    },
    Rule {
        api_group: "monitoring.coreos.com",
        resources: &["servicemonitors", "prometheusrules"],
        verbs: OWN,
        why: "monitoring children, where the cluster serves them (monitoring.rs)",
    },
    Rule {
        api_group: "coordination.k8s.io",
        resources: &["leases"],
        verbs: &["get", "create", "patch"],
        why: "leader election (leader.rs): one Lease, created if missing and renewed with server-side apply",
    },
    Rule {
        api_group: "events.k8s.io",
        resources: &["events"],
        verbs: &["create", "patch"],
        why: "events for auditors (reconcile::publish); patch: repeated events become a series",
    },
];

/// The rules as Kubernetes PolicyRules.
pub fn policy_rules() -> Vec<PolicyRule> {
    RULES
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.api_group.to_owned()]),
            resources: Some(r.resources.iter().map(|s| (*s).to_owned()).collect()),
            verbs: r.verbs.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .collect()
}

/// A ClusterRole holding every rule.
pub fn cluster_role(name: &str) -> ClusterRole {
    ClusterRole {
        metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
        rules: Some(policy_rules()),
        ..Default::default()
    }
}
