//! The FHIR server's database connection: built from the validated spec
//! with the `url` crate (never by joining strings of user data), and read
//! back from the applied Deployment, so that status says what the server
//! was really given.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar};
use percent_encoding::percent_decode_str;

use crate::api::SslMode;

/// Where the database CA is mounted in every container that connects.
pub const CA_DIR: &str = "/etc/fhir-server/database-ca";
/// The key of `spec.database.caSecret` that holds the CA, and its file name.
pub const CA_KEY: &str = "ca.crt";
/// The volume that mounts it.
pub const CA_VOLUME: &str = "database-ca";
/// The FHIR server's container.
pub const SERVER_CONTAINER: &str = "fhir-server";

/// The CA file inside a container.
pub fn ca_path() -> String {
    format!("{CA_DIR}/{CA_KEY}")
}

/// libpq's and pgjdbc's name of a mode.
pub fn ssl_mode(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

/// Where a connection goes and how it is secured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// A DNS name, an IPv4 address, or an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
    pub database: String,
    pub ssl_mode: String,
    /// `sslrootcert`: the CA file that verifies the server.
    pub root_cert: Option<String>,
}

/// `jdbc:postgresql://host:port/database?sslmode=...[&sslrootcert=...]`,
/// with the database percent-encoded as a path segment and the parameters
/// form-encoded (what pgjdbc's URL parser decodes).
pub fn jdbc_url(target: &Target) -> Result<String, url::ParseError> {
    let mut url = url::Url::parse("postgresql://localhost")?;
    match target.host.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => url.set_ip_host(ip.into()).map_err(|()| url::ParseError::InvalidIpv6Address)?,
        Err(_) => url.set_host(Some(&target.host))?,
    }
    url.set_port(Some(target.port)).map_err(|()| url::ParseError::InvalidPort)?;
    url.path_segments_mut()
        .map_err(|()| url::ParseError::RelativeUrlWithCannotBeABaseBase)?
        .clear()
        .push(&target.database);
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("sslmode", &target.ssl_mode);
        if let Some(cert) = &target.root_cert {
            query.append_pair("sslrootcert", cert);
        }
    }
    Ok(format!("jdbc:{url}"))
}

/// Parses a JDBC URL the way pgjdbc does: the query starts at the first
/// `?`; the server is what precedes the first `/`; a bracketed host is
/// IPv6, otherwise the port follows the last `:`; the database and the
/// parameter values are URL-decoded (`+` is a space, as in Java's
/// `URLDecoder`).
pub fn parse_jdbc(url: &str) -> Option<Target> {
    let rest = url.strip_prefix("jdbc:postgresql://")?;
    let (location, query) = match rest.split_once('?') {
        Some((l, q)) => (l, q),
        None => (rest, ""),
    };
    let (server, database) = location.split_once('/')?;
    let (host, port) = match server.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (host, after.strip_prefix(':').unwrap_or("5432"))
        }
        None => match server.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (server, "5432"),
        },
    };
    let mut target = Target {
        host: host.to_owned(),
        port: port.parse().ok()?,
        database: url_decode(database)?,
        ssl_mode: String::new(),
        root_cert: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = url_decode(value)?;
        match key {
            "sslmode" => target.ssl_mode = value,
            "sslrootcert" => target.root_cert = Some(value),
            _ => {}
        }
    }
    Some(target)
}

fn url_decode(text: &str) -> Option<String> {
    percent_decode_str(&text.replace('+', " ")).decode_utf8().ok().map(|s| s.into_owned())
}

/// The Secret key a CA file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSource {
    pub secret: String,
    pub key: String,
}

/// The database settings of an applied Deployment's FHIR server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The environment variable that carries them, for evidence.
    pub setting: &'static str,
    pub target: Target,
    /// Whether the server's driver can use TLS at all.
    pub tls_capable: bool,
    /// The Secret mounted where `sslrootcert` points, if any.
    pub ca: Option<CaSource>,
}

/// Reads the FHIR server's database connection from a Deployment as it was
/// applied. `None`: the server uses its embedded database (or the
/// Deployment holds no FHIR server container).
pub fn applied(deployment: &Deployment) -> Option<Applied> {
    let pod = deployment.spec.as_ref()?.template.spec.as_ref()?;
    let server = pod.containers.iter().find(|c| c.name == SERVER_CONTAINER)?;
    let value = |name: &str| env_value(server, name);
    let (setting, target, tls_capable) = if let Some(url) = value("SPRING_DATASOURCE_URL") {
        ("SPRING_DATASOURCE_URL", parse_jdbc(url)?, true)
    } else if value("HFS_STORAGE_BACKEND") == Some("postgres") {
        // hfs 0.2.7 connects with tokio-postgres and no TLS connector:
        // whatever the spec asks, the connection is not encrypted.
        let target = Target {
            host: value("HFS_PG_HOST")?.to_owned(),
            port: value("HFS_PG_PORT")?.parse().ok()?,
            database: value("HFS_PG_DBNAME")?.to_owned(),
            ssl_mode: "disable".to_owned(),
            root_cert: None,
        };
        ("HFS_PG_HOST", target, false)
    } else {
        return None;
    };
    let ca = target.root_cert.as_deref().and_then(|path| {
        let (dir, file) = path.rsplit_once('/')?;
        let mount = server.volume_mounts.iter().flatten().find(|m| m.mount_path == dir)?;
        let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name)?;
        let secret = volume.secret.as_ref()?;
        let key = match &secret.items {
            Some(items) => items.iter().find(|i| i.path == file)?.key.clone(),
            None => file.to_owned(),
        };
        Some(CaSource { secret: secret.secret_name.clone()?, key })
    });
    Some(Applied { setting, target, tls_capable, ca })
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.env.iter().flatten().find(|e: &&EnvVar| e.name == name)?.value.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str, database: &str) -> Target {
        Target {
            host: host.into(),
            port: 5432,
            database: database.into(),
            ssl_mode: "verify-full".into(),
            root_cert: Some(ca_path()),
        }
    }

    #[test]
    fn jdbc_urls_escape_and_parse_back() {
        let t = target("patients-db.databases.svc", "fhir");
        let url = jdbc_url(&t).unwrap();
        assert_eq!(
            url,
            "jdbc:postgresql://patients-db.databases.svc:5432/fhir?sslmode=verify-full\
             &sslrootcert=%2Fetc%2Ffhir-server%2Fdatabase-ca%2Fca.crt"
        );
        assert_eq!(parse_jdbc(&url), Some(t));
        let v6 = target("fd00::10", "a$b-c");
        let url = jdbc_url(&v6).unwrap();
        assert!(url.starts_with("jdbc:postgresql://[fd00::10]:5432/a$b-c?"), "{url}");
        assert_eq!(parse_jdbc(&url), Some(v6));
    }

    #[test]
    fn a_hostile_database_name_stays_one_path_segment() {
        let t = target("db", "fhir?sslmode=disable&x=/../#");
        let url = jdbc_url(&t).unwrap();
        assert_eq!(parse_jdbc(&url), Some(t), "{url}");
    }
}
