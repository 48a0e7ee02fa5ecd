//! The generated parts of the Helm chart (`charts/fhir-operator/`): its
//! RBAC rules, rendered from [`crate::rbac::RULES`] so that the chart grants
//! exactly what the e2e tests grant, each rule with its reason as a comment.
//! (Its `crds/` are written by `fhir-operator crds`.) A test fails when the
//! checked-in file drifts from the Rust list; `make chart` regenerates it.
//!
//! A namespaced install splits the rules by where they apply:
//! - rules on namespaced kinds go into a Role in each watched namespace;
//! - rules on cluster-scoped kinds (RateLimitTiers, which every endpoint
//!   dereferences and whose status the tier controller writes) can only be
//!   granted by a ClusterRole;
//! - rules on the operator's own coordination objects (leases) go into a
//!   Role in the release namespace only.

use crate::rbac::Rule;

/// Where the generated rules live, relative to the chart's directory.
pub const RULES_FILE: &str = "templates/_rules.tpl";

/// Built-in resources that are not namespaced, should a rule ever name one.
const CLUSTER_SCOPED_BUILTINS: &[(&str, &str)] = &[
    ("", "namespaces"),
    ("", "nodes"),
    ("", "persistentvolumes"),
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("storage.k8s.io", "storageclasses"),
    ("scheduling.k8s.io", "priorityclasses"),
    ("admissionregistration.k8s.io", "validatingwebhookconfigurations"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"),
    ("apiregistration.k8s.io", "apiservices"),
    ("certificates.k8s.io", "certificatesigningrequests"),
];

/// Resources the operator uses only in its own namespace (leader election).
const OWN_NAMESPACE: &[(&str, &str)] = &[("coordination.k8s.io", "leases")];

/// Where a rule's resource is granted in a namespaced install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A Role in every watched namespace.
    Watched,
    /// A ClusterRole: the resource is cluster-scoped.
    Cluster,
    /// A Role in the release namespace.
    Own,
}

impl Placement {
    const ALL: [Placement; 3] = [Placement::Watched, Placement::Cluster, Placement::Own];

    /// The name of the Helm template (`define`) holding these rules.
    pub fn template(self) -> &'static str {
        match self {
            Placement::Watched => "fhir-operator.rules.watched",
            Placement::Cluster => "fhir-operator.rules.cluster",
            Placement::Own => "fhir-operator.rules.own",
        }
    }
}

/// The template holding every rule unsplit (the ClusterRole of a
/// cluster-wide install).
pub const ALL_RULES_TEMPLATE: &str = "fhir-operator.rules.all";

/// Where `resource` (possibly `kind/subresource`) of `group` is granted.
pub fn placement(group: &str, resource: &str) -> Placement {
    let base = resource.split('/').next().unwrap_or(resource);
    let ours = crate::api::crds()
        .into_iter()
        .any(|(plural, crd)| group == crate::api::GROUP && plural == base && crd.spec.scope == "Cluster");
    if ours || CLUSTER_SCOPED_BUILTINS.contains(&(group, base)) {
        Placement::Cluster
    } else if OWN_NAMESPACE.contains(&(group, base)) {
        Placement::Own
    } else {
        Placement::Watched
    }
}

/// The part of `rule` granted at `at`, if any of its resources is.
fn part(rule: &Rule, at: Placement) -> Option<Vec<&'static str>> {
    let resources: Vec<&'static str> =
        rule.resources.iter().copied().filter(|r| placement(rule.api_group, r) == at).collect();
    (!resources.is_empty()).then_some(resources)
}

fn quoted(items: &[&str]) -> String {
    let inner: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", inner.join(", "))
}

/// One rule as YAML, its reason first as comment lines.
fn rule_yaml(out: &mut String, rule: &Rule, resources: &[&str]) {
    let why = rule.why.split_whitespace().collect::<Vec<_>>().join(" ");
    // `{{` would start a template action inside the comment.
    let why = why.replace("{{", "{ {");
    let mut line = String::from("#");
    for word in why.split(' ') {
        if line.len() + word.len() > 100 && line.len() > 1 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out.push_str(&format!("- apiGroups: {}\n", quoted(&[rule.api_group])));
    out.push_str(&format!("  resources: {}\n", quoted(resources)));
    out.push_str(&format!("  verbs: {}\n", quoted(rule.verbs)));
}

fn define(out: &mut String, name: &str, body: &str) {
    out.push_str(&format!("{{{{- define {name:?} -}}}}\n"));
    // An empty list keeps the including manifest valid YAML.
    out.push_str(if body.is_empty() { "[]\n" } else { body });
    out.push_str("{{- end }}\n");
}

/// The chart's rules file: one `define` per placement, and one with every
/// rule as written.
pub fn rules_template(rules: &[Rule]) -> String {
    let mut out = String::from(
        "{{/*\nGenerated by `fhir-operator chart-rbac` from operator/src/rbac.rs; do not edit.\n\
         `make chart` regenerates it; operator/tests/crds_up_to_date.rs fails on drift.\n*/}}\n",
    );
    let mut all = String::new();
    for rule in rules {
        rule_yaml(&mut all, rule, rule.resources);
    }
    define(&mut out, ALL_RULES_TEMPLATE, &all);
    for at in Placement::ALL {
        let mut body = String::new();
        for rule in rules {
            if let Some(resources) = part(rule, at) {
                rule_yaml(&mut body, rule, &resources);
            }
        }
        define(&mut out, at.template(), &body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[Rule] = &[
        Rule {
            api_group: "fhiroperator.io",
            resources: &["fhirendpoints", "ratelimittiers"],
            verbs: &["get", "list"],
            why: "a reason long enough to be wrapped: the quick brown fox jumps over the lazy dog, \
                  then over the lazy dog again, and {{ once more }}",
        },
        Rule { api_group: "fhiroperator.io", resources: &["ratelimittiers/status"], verbs: &["patch"], why: "tiers" },
        Rule { api_group: "coordination.k8s.io", resources: &["leases"], verbs: &["get", "update"], why: "leader" },
    ];

    #[test]
    fn rules_are_placed_by_the_scope_of_their_resources() {
        assert_eq!(placement("fhiroperator.io", "ratelimittiers"), Placement::Cluster);
        assert_eq!(placement("fhiroperator.io", "ratelimittiers/status"), Placement::Cluster);
        assert_eq!(placement("fhiroperator.io", "fhirendpoints/status"), Placement::Watched);
        assert_eq!(placement("", "secrets"), Placement::Watched);
        assert_eq!(placement("", "namespaces"), Placement::Cluster);
        assert_eq!(placement("coordination.k8s.io", "leases"), Placement::Own);
    }

    #[test]
    fn a_mixed_rule_is_split_and_every_reason_stays_a_comment() {
        let text = rules_template(SAMPLE);
        let section = |name: &str| {
            let start = text.find(&format!("define {name:?}")).expect(name);
            let end = start + text[start..].find("{{- end }}").expect("end");
            text[start..end].to_owned()
        };
        let watched = section(Placement::Watched.template());
        assert!(watched.contains(r#"resources: ["fhirendpoints"]"#), "{watched}");
        assert!(!watched.contains("ratelimittiers") && !watched.contains("leases"), "{watched}");
        let cluster = section(Placement::Cluster.template());
        assert!(cluster.contains(r#"resources: ["ratelimittiers"]"#), "{cluster}");
        assert!(cluster.contains(r#"resources: ["ratelimittiers/status"]"#), "{cluster}");
        let own = section(Placement::Own.template());
        assert!(own.contains(r#"resources: ["leases"]"#) && !own.contains("fhiroperator.io"), "{own}");
        let all = section(ALL_RULES_TEMPLATE);
        assert!(all.contains(r#"resources: ["fhirendpoints", "ratelimittiers"]"#), "{all}");
        for line in text.lines().filter(|l| l.starts_with('#')) {
            assert!(line.len() <= 110, "comment line too long: {line}");
        }
        assert!(!text.contains("{{ once"), "a reason must not open a template action");
        assert_eq!(text.matches("# leader").count(), 2, "the reason travels with each part of the rule");
    }

    #[test]
    fn an_empty_placement_renders_an_empty_list() {
        let text = rules_template(&SAMPLE[..1]);
        let own = format!("define {:?} -}}}}\n[]\n", Placement::Own.template());
        assert!(text.contains(&own), "{text}");
    }
}
