//! SMART on FHIR scopes and what a request needs of them: pure, shared by
//! the endpoint's validation, its `accessControl` compliance entry and the
//! gateway's token verifier (`fhir-operator gateway-auth`).
//!
//! A scope is `context/Type.permissions`: context `system`, `user` or
//! `patient`; `Type` a FHIR resource type or `*`; permissions a non-empty
//! subset of `cruds` in that order (SMART v2), or v1's `read` (= `rs`),
//! `write` (= `cud`) and `*` (= `cruds`). The gateway enforces resource type
//! and interaction only: `patient/` and `user/` scopes restrict access to
//! the records of one patient or user, which the gateway cannot see, so
//! they are refused in an endpoint's spec and grant nothing in a token.
//! Scopes with a query (`?category=...`, SMART v2 granular scopes) are
//! refused for the same reason.
//!
//! [`classify`] turns method, path and query into the (type, permission)
//! pairs a request needs; [`Grants::allow`] answers whether scopes grant
//! them all. Requests the gateway cannot read exactly (batch and
//! transaction Bundles, `$operations`, paths no FHIR interaction has) need
//! every permission on every type (`system/*.cruds`).

use std::collections::BTreeSet;
use std::fmt;

/// The context a scope applies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    System,
    User,
    Patient,
}

/// One SMART permission letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    pub const ALL: [Permission; 5] =
        [Permission::Create, Permission::Read, Permission::Update, Permission::Delete, Permission::Search];

    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }

    /// Create, update and delete change data.
    pub fn writes(self) -> bool {
        matches!(self, Permission::Create | Permission::Update | Permission::Delete)
    }
}

/// A resource-access scope.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scope {
    pub context: Context,
    /// `None` for `*`: every resource type.
    pub resource: Option<String>,
    pub permissions: BTreeSet<Permission>,
}

/// Why a scope string is not one the gateway can enforce. Messages quote
/// the scope: scopes are not secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope {0:?} is not context/Type.permissions (e.g. system/Patient.rs)")]
    Syntax(String),
    #[error("scope {0:?}: permissions must be a subset of c r u d s in that order, or read, write or * (SMART v1)")]
    Permissions(String),
    #[error("scope {0:?}: {1:?} is not a FHIR resource type (a capital letter, then letters) or *")]
    ResourceType(String, String),
    #[error(
        "scope {0:?}: patient/ and user/ scopes limit access to one patient's or user's records, which the \
         gateway cannot enforce; grant system/ scopes"
    )]
    NotEnforceable(String),
    #[error("scope {0:?}: scopes with a query (granular scopes) cannot be enforced by the gateway")]
    Granular(String),
}

impl Scope {
    /// Parses one resource-access scope, refusing what the gateway cannot
    /// enforce (see the module's documentation).
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        let syntax = || ScopeError::Syntax(text.to_owned());
        if text.contains('?') {
            return Err(ScopeError::Granular(text.to_owned()));
        }
        let (context, rest) = text.split_once('/').ok_or_else(syntax)?;
        let context = match context {
            "system" => Context::System,
            "user" => Context::User,
            "patient" => Context::Patient,
            _ => return Err(syntax()),
        };
        let (resource, permissions) = rest.split_once('.').ok_or_else(syntax)?;
        let resource = match resource {
            "*" => None,
            name if is_resource_type(name) => Some(name.to_owned()),
            name => return Err(ScopeError::ResourceType(text.to_owned(), name.to_owned())),
        };
        let permissions = parse_permissions(permissions).ok_or_else(|| ScopeError::Permissions(text.to_owned()))?;
        if context != Context::System {
            return Err(ScopeError::NotEnforceable(text.to_owned()));
        }
        Ok(Scope { context, resource, permissions })
    }

    /// True when the scope covers every resource type with a permission
    /// that changes data.
    pub fn is_wildcard_write(&self) -> bool {
        self.resource.is_none() && self.permissions.iter().any(|p| p.writes())
    }

    fn grants(&self, need: &Need) -> bool {
        let type_matches = match (&self.resource, &need.resource) {
            (None, _) => true,
            (Some(have), Some(want)) => have == want,
            (Some(_), None) => false,
        };
        type_matches && self.permissions.contains(&need.permission)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let context = match self.context {
            Context::System => "system",
            Context::User => "user",
            Context::Patient => "patient",
        };
        let letters: String = self.permissions.iter().map(|p| p.letter()).collect();
        write!(f, "{context}/{}.{letters}", self.resource.as_deref().unwrap_or("*"))
    }
}

/// A FHIR resource type name: a capital ASCII letter, then letters (at most
/// 64 in all).
pub fn is_resource_type(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64 && bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphabetic())
}

fn parse_permissions(text: &str) -> Option<BTreeSet<Permission>> {
    let set = |letters: &str| letters.chars().map(permission_of).collect::<Option<BTreeSet<_>>>();
    match text {
        "read" => set("rs"),
        "write" => set("cud"),
        "*" => set("cruds"),
        letters => {
            // A non-empty subsequence of "cruds": each letter after the last.
            let mut order = "cruds".chars();
            if letters.is_empty() || !letters.chars().all(|l| order.any(|o| o == l)) {
                return None;
            }
            set(letters)
        }
    }
}

fn permission_of(letter: char) -> Option<Permission> {
    Permission::ALL.into_iter().find(|p| p.letter() == letter)
}

/// One permission a request needs, on one resource type (`None`: on every
/// type, which only a `*` scope grants).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Need {
    pub resource: Option<String>,
    pub permission: Permission,
}

impl Need {
    fn on(resource: &str, permission: Permission) -> Need {
        Need { resource: Some(resource.to_owned()), permission }
    }

    fn everywhere(permission: Permission) -> Need {
        Need { resource: None, permission }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.resource.as_deref().unwrap_or("*"), self.permission.letter())
    }
}

/// The FHIR interaction a request is, as the gateway reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Capabilities,
    Read,
    Vread,
    History,
    Search,
    Create,
    Update,
    Patch,
    Delete,
    Operation,
    Batch,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Capabilities => "capabilities",
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::History => "history",
            Interaction::Search => "search",
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::Operation => "operation",
            Interaction::Batch => "batch",
        }
    }
}

/// What a request is and what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub interaction: Interaction,
    pub resource: Option<String>,
    /// Every permission needed; empty for the CapabilityStatement, which
    /// every authenticated client may read.
    pub needs: Vec<Need>,
}

/// Why the gateway refuses to classify a request (answered 403: it cannot
/// tell what the request would touch).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    #[error("the path is not under the FHIR base")]
    OutsideBase,
    #[error("the path holds a character or segment that no FHIR interaction uses")]
    BadPath,
    #[error("no FHIR interaction has this method and path")]
    NoInteraction,
}

/// Every permission on every type: what requests the gateway cannot read
/// exactly need.
fn everything() -> Vec<Need> {
    Permission::ALL.into_iter().map(Need::everywhere).collect()
}

/// Classifies a request: `method` as sent, `path` the raw path (before
/// `?`, not percent-decoded), `query` the raw query string, `base` the FHIR
/// base path (`/` or e.g. `/fhir`).
///
/// A FHIR REST path needs no percent-encoding (types, ids, `_history`,
/// `_search` and `$operation` names are letters, digits, `-`, `.`, `_` and
/// `$`), so a path with anything else, or with an empty, `.` or `..`
/// segment, is refused rather than decoded: the gateway and the FHIR
/// server must not read it differently.
pub fn classify(method: &str, path: &str, query: &str, base: &str) -> Result<Classified, ClassifyError> {
    let base = base.trim_end_matches('/');
    let rest = path.strip_prefix(base).ok_or(ClassifyError::OutsideBase)?;
    let rest = match rest {
        "" | "/" => "",
        r => r.strip_prefix('/').ok_or(ClassifyError::OutsideBase)?,
    };
    let segments: Vec<&str> = if rest.is_empty() { Vec::new() } else { rest.split('/').collect() };
    for segment in &segments {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._$".contains(&b);
        if segment.is_empty() || *segment == "." || *segment == ".." || !segment.bytes().all(allowed) {
            return Err(ClassifyError::BadPath);
        }
    }
    let method = match method {
        "HEAD" => "GET",
        m => m,
    };
    use Interaction as I;
    use Permission as P;
    let whole = |interaction| Classified { interaction, resource: None, needs: everything() };
    let on = |interaction, resource: &str, needs: Vec<Need>| Classified {
        interaction,
        resource: Some(resource.to_owned()),
        needs,
    };
    let is_op = |s: &str| s.starts_with('$');
    let classified = match (method, segments.as_slice()) {
        ("GET", ["metadata"]) => Classified { interaction: I::Capabilities, resource: None, needs: Vec::new() },
        // Batch and transaction Bundles: their entries are in the body.
        ("POST", []) => whole(I::Batch),
        (_, [op, ..]) if is_op(op) => whole(I::Operation),
        (_, [_, op, ..]) if is_op(op) => whole(I::Operation),
        (_, [_, _, op, ..]) if is_op(op) => whole(I::Operation),
        // System-wide search and history: every type.
        ("GET", []) => whole_search(query),
        ("POST", ["_search"]) => whole(I::Search),
        ("GET", ["_history"]) => {
            Classified { interaction: I::History, resource: None, needs: vec![Need::everywhere(P::Read)] }
        }
        (_, [t, ..]) if !is_resource_type(t) => return Err(ClassifyError::NoInteraction),
        ("GET", [t]) => on(I::Search, t, search_needs(t, query)),
        // The search parameters are in the body, where `_include` could
        // name any type: reading every type is needed.
        ("POST", [t, "_search"]) => on(I::Search, t, vec![Need::on(t, P::Search), Need::everywhere(P::Read)]),
        ("POST", [t]) => on(I::Create, t, vec![Need::on(t, P::Create)]),
        // Conditional update, patch and delete search for their target.
        ("PUT", [t]) => on(I::Update, t, vec![Need::on(t, P::Update), Need::on(t, P::Search)]),
        ("PATCH", [t]) => on(I::Patch, t, vec![Need::on(t, P::Update), Need::on(t, P::Search)]),
        ("DELETE", [t]) => on(I::Delete, t, vec![Need::on(t, P::Delete), Need::on(t, P::Search)]),
        ("GET", [t, "_history"]) => on(I::History, t, vec![Need::on(t, P::Read)]),
        ("GET", [t, id]) if is_id(id) => on(I::Read, t, vec![Need::on(t, P::Read)]),
        ("PUT", [t, id]) if is_id(id) => on(I::Update, t, vec![Need::on(t, P::Update)]),
        ("PATCH", [t, id]) if is_id(id) => on(I::Patch, t, vec![Need::on(t, P::Update)]),
        ("DELETE", [t, id]) if is_id(id) => on(I::Delete, t, vec![Need::on(t, P::Delete)]),
        ("GET", [t, id, "_history"]) if is_id(id) => on(I::History, t, vec![Need::on(t, P::Read)]),
        ("GET", [t, id, "_history", v]) if is_id(id) && is_id(v) => on(I::Vread, t, vec![Need::on(t, P::Read)]),
        // Compartment search: Patient/1/Observation searches Observations.
        ("GET", [_, id, t]) if is_id(id) && is_resource_type(t) => on(I::Search, t, search_needs(t, query)),
        _ => return Err(ClassifyError::NoInteraction),
    };
    Ok(classified)
}

fn whole_search(query: &str) -> Classified {
    let mut needs = vec![Need::everywhere(Permission::Search), Need::everywhere(Permission::Read)];
    needs.extend(include_needs(query));
    Classified { interaction: Interaction::Search, resource: None, needs }
}

/// A logical id or version id: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_id(text: &str) -> bool {
    (1..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn search_needs(resource: &str, query: &str) -> Vec<Need> {
    let mut needs = vec![Need::on(resource, Permission::Search)];
    needs.extend(include_needs(query));
    needs.sort();
    needs.dedup();
    needs
}

/// What a search's query adds: `_include` reads the target type (any type
/// when the target is not named), `_revinclude` reads the source type,
/// `_has` searches the type it names.
fn include_needs(query: &str) -> Vec<Need> {
    let mut needs = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let base_name = name.split(':').next().unwrap_or_default();
        match base_name {
            "_include" => {
                // Type:param[:target]; `*` or no target reads any type.
                let parts: Vec<&str> = value.split(':').collect();
                match parts.as_slice() {
                    [_, _, target] if is_resource_type(target) => needs.push(Need::on(target, Permission::Read)),
                    _ => needs.push(Need::everywhere(Permission::Read)),
                }
            }
            "_revinclude" => match value.split(':').next() {
                Some(source) if is_resource_type(source) => needs.push(Need::on(source, Permission::Read)),
                _ => needs.push(Need::everywhere(Permission::Read)),
            },
            "_has" => match name.split(':').nth(1) {
                Some(source) if is_resource_type(source) => needs.push(Need::on(source, Permission::Search)),
                _ => needs.push(Need::everywhere(Permission::Search)),
            },
            _ => {}
        }
    }
    needs
}

/// A set of scopes: what a client may do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub scopes: Vec<Scope>,
}

impl Grants {
    /// Every permission on every type (an endpoint without `clients`).
    pub fn all() -> Grants {
        Grants {
            scopes: vec![Scope {
                context: Context::System,
                resource: None,
                permissions: Permission::ALL.into_iter().collect(),
            }],
        }
    }

    /// The enforceable scopes of a token's `scope` claim (space-separated):
    /// others (`openid`, `patient/...`, malformed ones) grant nothing.
    pub fn from_claim(claim: &str) -> Grants {
        Grants { scopes: claim.split_ascii_whitespace().filter_map(|s| Scope::parse(s).ok()).collect() }
    }

    /// The first need these scopes do not grant, if any.
    pub fn missing<'a>(&self, needs: &'a [Need]) -> Option<&'a Need> {
        needs.iter().find(|need| !self.scopes.iter().any(|scope| scope.grants(need)))
    }

    /// Whether every need is granted.
    pub fn allow(&self, needs: &[Need]) -> bool {
        self.missing(needs).is_none()
    }

    /// Space-separated, as a `scope` claim.
    pub fn to_claim(&self) -> String {
        self.scopes.iter().map(Scope::to_string).collect::<Vec<_>>().join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(scopes: &[&str]) -> Grants {
        Grants { scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect() }
    }

    fn allowed(scopes: &[&str], method: &str, target: &str) -> bool {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        match classify(method, path, query, "/fhir") {
            Ok(c) => grants(scopes).allow(&c.needs),
            Err(_) => false,
        }
    }

    #[test]
    fn v2_and_v1_scopes_parse_to_the_same_permissions() {
        assert_eq!(Scope::parse("system/Patient.read").unwrap(), Scope::parse("system/Patient.rs").unwrap());
        assert_eq!(Scope::parse("system/*.write").unwrap(), Scope::parse("system/*.cud").unwrap());
        assert_eq!(Scope::parse("system/*.*").unwrap(), Scope::parse("system/*.cruds").unwrap());
        assert_eq!(Scope::parse("system/Observation.cruds").unwrap().to_string(), "system/Observation.cruds");
    }

    #[test]
    fn scopes_the_gateway_cannot_enforce_are_refused_by_name() {
        for bad in ["system/Patient.sr", "system/Patient.", "system/Patient.x", "system/Patient.rr"] {
            assert!(matches!(Scope::parse(bad), Err(ScopeError::Permissions(_))), "{bad}");
        }
        assert!(matches!(Scope::parse("patient/Observation.rs"), Err(ScopeError::NotEnforceable(_))));
        assert!(matches!(Scope::parse("user/*.cruds"), Err(ScopeError::NotEnforceable(_))));
        assert!(matches!(Scope::parse("system/Observation.rs?category=lab"), Err(ScopeError::Granular(_))));
        assert!(matches!(Scope::parse("system/patient.rs"), Err(ScopeError::ResourceType(..))));
        assert!(matches!(Scope::parse("openid"), Err(ScopeError::Syntax(_))));
        assert!(matches!(Scope::parse("admin/Patient.rs"), Err(ScopeError::Syntax(_))));
    }

    #[test]
    fn each_interaction_needs_its_own_permission() {
        let reader = ["system/Patient.rs"];
        assert!(allowed(&reader, "GET", "/fhir/Patient/1"));
        assert!(allowed(&reader, "GET", "/fhir/Patient/1/_history/2"));
        assert!(allowed(&reader, "GET", "/fhir/Patient/1/_history"));
        assert!(allowed(&reader, "GET", "/fhir/Patient?name=x"));
        assert!(allowed(&reader, "HEAD", "/fhir/Patient/1"));
        assert!(allowed(&reader, "GET", "/fhir/metadata"));
        assert!(!allowed(&reader, "POST", "/fhir/Patient"));
        assert!(!allowed(&reader, "PUT", "/fhir/Patient/1"));
        assert!(!allowed(&reader, "PATCH", "/fhir/Patient/1"));
        assert!(!allowed(&reader, "DELETE", "/fhir/Patient/1"));
        assert!(!allowed(&reader, "GET", "/fhir/Observation/1"));
        // POST _search may carry _include in its body, out of sight.
        assert!(!allowed(&reader, "POST", "/fhir/Patient/_search"));
        assert!(allowed(&["system/Patient.s", "system/*.r"], "POST", "/fhir/Patient/_search"));
        let writer = ["system/Patient.cud"];
        assert!(allowed(&writer, "POST", "/fhir/Patient"));
        assert!(allowed(&writer, "PUT", "/fhir/Patient/1"));
        assert!(allowed(&writer, "DELETE", "/fhir/Patient/1"));
        assert!(!allowed(&writer, "PUT", "/fhir/Patient?identifier=x"), "conditional update also searches");
        assert!(!allowed(&writer, "GET", "/fhir/Patient/1"));
    }

    #[test]
    fn includes_need_a_read_scope_on_the_included_type() {
        let s = ["system/Observation.rs"];
        assert!(!allowed(&s, "GET", "/fhir/Observation?_include=Observation:subject:Patient"));
        assert!(allowed(
            &["system/Observation.rs", "system/Patient.r"],
            "GET",
            "/fhir/Observation?_include=Observation:subject:Patient"
        ));
        assert!(
            !allowed(&s, "GET", "/fhir/Observation?_include=Observation:subject"),
            "untyped include reads any type"
        );
        assert!(!allowed(&s, "GET", "/fhir/Observation?_include%3Aiterate=Observation%3Asubject%3APatient"));
        assert!(!allowed(&["system/Patient.rs"], "GET", "/fhir/Patient?_revinclude=Observation:subject"));
        assert!(!allowed(&["system/Patient.rs"], "GET", "/fhir/Patient?_has:Observation:patient:code=1"));
        assert!(allowed(&["system/*.rs"], "GET", "/fhir/Patient?_revinclude=Observation:subject"));
    }

    #[test]
    fn operations_and_bundles_need_every_permission_on_every_type() {
        let all = ["system/*.cruds"];
        for (method, target) in [
            ("POST", "/fhir"),
            ("POST", "/fhir/"),
            ("GET", "/fhir/Patient/1/$everything"),
            ("POST", "/fhir/Patient/$validate"),
            ("POST", "/fhir/$export"),
        ] {
            assert!(allowed(&all, method, target), "{method} {target}");
            assert!(!allowed(&["system/*.rs", "system/Patient.cruds"], method, target), "{method} {target}");
        }
    }

    #[test]
    fn paths_that_could_be_read_two_ways_are_refused() {
        for path in [
            "/fhir/Patient/%31",
            "/fhir/Patient//1",
            "/fhir/Observation/../Patient/1",
            "/fhir/Patient/1;x",
            "/fhirPatient/1",
            "/other/Patient/1",
        ] {
            assert!(classify("GET", path, "", "/fhir").is_err(), "{path}");
        }
        assert_eq!(classify("GET", "/fhir/patient", "", "/fhir"), Err(ClassifyError::NoInteraction));
        assert_eq!(classify("GET", "/Patient/1", "", "/").unwrap().interaction, Interaction::Read);
    }

    #[test]
    fn token_claims_grant_only_enforceable_scopes() {
        let g = Grants::from_claim("openid patient/*.rs system/Patient.rs garbage");
        assert_eq!(g.to_claim(), "system/Patient.rs");
        assert!(Grants::all().allow(&everything()));
    }
}
