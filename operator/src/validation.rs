//! Field grammars shared by the CRD schemas (as patterns) and the
//! operator's own checks (as functions), so that what reaches a connection
//! string, a URL, an environment variable or a command line is exactly what
//! the documentation promises. Every check returns why a value is refused,
//! never panics, and never echoes more than the value it was given.

use std::net::{Ipv4Addr, Ipv6Addr};

/// `spec.database.host` in the schema: a DNS-1123 subdomain whose labels are
/// at most 63 characters, or an IPv6 address written bare (`fd00::10`, no
/// brackets, no zone). The operator checks the rest: an all-numeric host
/// must be a valid IPv4 address, and an IPv6 one must parse.
pub const HOST_PATTERN: &str = concat!(
    "^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*",
    "|[0-9a-fA-F.]*:[0-9a-fA-F:.]*)$"
);

/// `spec.database.name`: PostgreSQL's unquoted identifier grammar in ASCII
/// (a letter or `_`, then letters, digits, `_` or `$`), plus `-`, which
/// database names often hold. At most 63 bytes (NAMEDATALEN - 1).
pub const DATABASE_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$";

/// `spec.server.image`: the OCI/docker reference grammar,
/// `[registry[:port]/]path[:tag][@sha256:digest]`.
pub const IMAGE_PATTERN: &str = concat!(
    "^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(\\.([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*",
    "(:[0-9]+)?/)?",
    "[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*",
    "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?",
    "(@sha256:[a-f0-9]{64})?$"
);

/// `spec.publicUrl` in the schema: https, a host, an optional port and path;
/// no user information, query or fragment. The operator parses it fully.
pub const PUBLIC_URL_PATTERN: &str = r"^https://[^/?#@\s]+(/[^?#@\s]*)?$";

/// A DNS-1123 subdomain of at most 253 characters (names of Secrets,
/// ConfigMaps, KeyRotationSchedules, RateLimitTiers, PVCs).
pub fn dns_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    if value.split('.').all(|label| dns_label_shape(label) && label.len() <= 63) {
        Ok(())
    } else {
        Err("must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit"
            .into())
    }
}

fn dns_label_shape(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// What a database host is, once accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    Name,
    Ipv4,
    Ipv6,
}

/// `spec.database.host`: a DNS subdomain, an IPv4 address, or a bare IPv6
/// address.
pub fn database_host(value: &str) -> Result<HostKind, String> {
    if value.contains(':') {
        return value
            .parse::<Ipv6Addr>()
            .map(|_| HostKind::Ipv6)
            .map_err(|_| "is not a valid IPv6 address (write it bare, as fd00::10, without brackets)".to_owned());
    }
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return value
            .parse::<Ipv4Addr>()
            .map(|_| HostKind::Ipv4)
            .map_err(|_| "is all digits and dots but not a valid IPv4 address".to_owned());
    }
    dns_subdomain(value)
        .map(|()| HostKind::Name)
        .map_err(|e| format!("{e}; or an IPv4 address, or an IPv6 address written bare (no user, port, path or query)"))
}

/// `spec.database.name`: see [`DATABASE_NAME_PATTERN`].
pub fn database_name(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_$-".contains(c));
    if ok {
        Ok(())
    } else {
        Err("must be 1 to 63 characters: an ASCII letter or '_', then letters, digits, '_', '$' or '-'".into())
    }
}

/// `spec.server.image`: see [`IMAGE_PATTERN`]. Also at most 255 characters
/// for the name (registry and path), as the registries require.
pub fn image_reference(value: &str) -> Result<(), String> {
    const GRAMMAR: &str = "must be an image reference [registry[:port]/]path[:tag][@sha256:digest] \
                           (path in lowercase letters, digits and . _ -)";
    let (rest, digest) = match value.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (value, None),
    };
    if let Some(digest) = digest {
        let hex = digest.strip_prefix("sha256:").ok_or(GRAMMAR)?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(GRAMMAR.into());
        }
    }
    // A tag follows the last ':' that comes after the last '/'.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let t = tag.as_bytes();
        let ok = !t.is_empty()
            && t.len() <= 128
            && (t[0].is_ascii_alphanumeric() || t[0] == b'_')
            && t.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c));
        if !ok {
            return Err(GRAMMAR.into());
        }
    }
    if name.is_empty() || name.len() > 255 {
        return Err(GRAMMAR.into());
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first component is a registry when it looks like a host: it has a
    // '.' or a ':', is `localhost`, or holds an uppercase letter (docker's rule).
    let first = components[0];
    let is_registry = components.len() > 1
        && (first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()));
    if is_registry {
        components.remove(0);
        let (host, port) = match first.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (first, None),
        };
        let host_ok = !host.is_empty()
            && host.split('.').all(|c| {
                let b = c.as_bytes();
                !b.is_empty()
                    && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
                    && b[0] != b'-'
                    && b[b.len() - 1] != b'-'
            });
        let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !host_ok || !port_ok {
            return Err(GRAMMAR.into());
        }
    }
    if components.iter().all(|c| path_component(c)) { Ok(()) } else { Err(GRAMMAR.into()) }
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A container environment variable name as Kubernetes accepts it:
/// `[-._a-zA-Z][-._a-zA-Z0-9]*`.
pub fn env_name(value: &str) -> Result<(), String> {
    let b = value.as_bytes();
    let ok =
        !b.is_empty() && !b[0].is_ascii_digit() && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-._".contains(c));
    if ok { Ok(()) } else { Err("must be a valid environment variable name: [-._a-zA-Z][-._a-zA-Z0-9]*".into()) }
}

/// A public base URL: https, a host (DNS name or IP), an optional port and
/// path; no user information, query or fragment. Returns it normalised by
/// the URL parser, without a trailing `/`.
pub fn public_url(value: &str) -> Result<url::Url, String> {
    if value.len() > 2048 {
        return Err("must be at most 2048 characters".into());
    }
    if value.bytes().any(|b| !b.is_ascii_graphic() || b"\"<>\\^`{|}".contains(&b)) {
        return Err("must be printable ASCII without spaces, quotes or any of < > \\ ^ ` { | }".into());
    }
    // Checked on the text too: the URL parser forgives (`https:///x` has
    // host `x` to it).
    if !value.strip_prefix("https://").is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/')) {
        return Err("must start with https:// and a host: the gateway serves TLS only".into());
    }
    let url = url::Url::parse(value).map_err(|e| format!("is not a URL: {e}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold user information".into());
    }
    if url.query().is_some() || url.fragment().is_some() || value.contains(['?', '#']) {
        return Err("must not have a query or fragment".into());
    }
    match url.host() {
        Some(url::Host::Domain(d)) => {
            dns_subdomain(d).map_err(|e| format!("host {e}"))?;
        }
        Some(_) => {}
        None => return Err("must have a host".into()),
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in ["db", "patients-db.databases.svc", "10.0.0.7", "fd00::10", "::1", "a.b-c.d9"] {
            assert!(database_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "evil.example/fhir?sslmode=disable&x=",
            "DB.example",
            "db..x",
            "-db",
            "db-",
            "a b",
            "user@db",
            "db:5432",
            "[fd00::1]",
            "999.1.1.1",
            "1.2.3",
            "db\n",
            "ä.example",
            &"a".repeat(64),
            &format!("{}.x", "a.".repeat(130)),
        ] {
            assert!(database_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn database_names() {
        for ok in ["fhir", "_x", "Fhir_2", "fhir-prod", "a$b", &"a".repeat(63)] {
            assert!(database_name(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "1fhir", "fhir?x", "a/b", "a b", "a#", "a&b", "a@b", "a%20", "a'b", "a\"b", "é", &"a".repeat(64)]
        {
            assert!(database_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn images() {
        let digest = "a".repeat(64);
        for ok in [
            "hapiproject/hapi:v7.4.0",
            "nginx",
            "registry.example:5000/platform/fhir-server:1.0",
            "localhost/x",
            "ghcr.io/heliossoftware/hfs:0.2.7",
            &format!("ghcr.io/heliossoftware/hfs@sha256:{digest}"),
            &format!("hfs:0.2.7@sha256:{digest}"),
            "a__b/c-----d.e_f",
        ] {
            assert!(image_reference(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "Hapi",
            "hapi:",
            "hapi:-x",
            "hapi@sha256:abc",
            "hapi@md5:0",
            "/hapi",
            "hapi/",
            "a//b",
            "a..b",
            "reg.example:/x",
            "x;rm -rf",
            "hapi:v1\n",
            &format!("x:{}", "t".repeat(129)),
        ] {
            assert!(image_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn public_urls() {
        assert_eq!(
            public_url("https://patients.clinical.svc/fhir").unwrap().as_str(),
            "https://patients.clinical.svc/fhir"
        );
        assert!(public_url("https://localhost:8443").is_ok());
        assert!(public_url("https://[fd00::1]/fhir").is_ok());
        for bad in [
            "http://x/fhir",
            "https://user:pw@x/fhir",
            "https://x/fhir?a=b",
            "https://x/fhir#f",
            "https:///fhir",
            "https://x_y/fhir",
            "x",
            "https://x/fhir\"",
        ] {
            assert!(public_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_names() {
        assert!(env_name("JAVA_OPTS").is_ok() && env_name("a.b-c").is_ok());
        assert!(env_name("1X").is_err() && env_name("A B").is_err() && env_name("").is_err());
    }
}
