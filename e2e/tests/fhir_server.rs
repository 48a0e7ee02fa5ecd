//! Flavor helios against the real thing: the Helios FHIR Server (hfs 0.2.7,
//! `e2e/hfs.sh`) on a real PostgreSQL 15, behind a real nginx running the
//! gateway configuration the operator renders (TLS 1.3, API keys), all on
//! loopback. hfs gets exactly the environment the operator renders for its
//! container, with the Secret references resolved from the test's
//! credentials; only what cannot be the same on loopback is overridden
//! (each override says why). Then, through the gateway:
//! - hfs really uses the rendered database settings (tables owned by the
//!   Secret's user, whose password PostgreSQL checks);
//! - a create answers 201 with a `Location` on the public https URL;
//! - search pages link to the public URL, and a real FHIR client (PyPI
//!   fhirpy, which refuses links off its base URL) follows them over TLS;
//! - the PyPI sekmet-fhir `conformance_smoke` suite passes;
//! - no API key is a 401, and a client's `X-Forwarded-Host` changes no URL.
//!
//! Missing hfs, nginx, PostgreSQL or the Python tools fail the test naming
//! what to install; nothing is skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fhir_operator::api::{FhirEndpoint, RateLimitTierSpec};
use fhir_operator::discovery::{Capabilities, PdbApi};
use fhir_operator::fhirendpoint::build::{self, Images, Inputs, KeySource, NGINX_CONF_KEY};
use fhir_operator::fhirendpoint::database::SERVER_CONTAINER;
use fhir_operator::fhirendpoint::gateway::{self, GatewaySettings};
use fhir_operator::fhirendpoint::{pod, validate};
use fhir_operator_e2e::fhir_client::{self, Client, next_link, patient};
use fhir_operator_e2e::postgres::{self, Postgres};
use fhir_operator_e2e::{hfs, venv};
use k8s_openapi::api::core::v1::EnvVar;
use serde_json::json;

/// The key the gateway accepts (256 bits, hex, as the operator issues them).
const API_KEY: &str = "3c6e0b8a9c15224a8228b9a98ca1531d6b2bd0a2c8a5b1f4e6d7c8b9a0f1e2d3";
/// The database user and password in the endpoint's credentials Secret. The
/// password holds characters a URL would need escaped: hfs must take it
/// verbatim from HFS_PG_PASSWORD.
const DB_USER: &str = "fhir_app";
const DB_PASSWORD: &str = "p@ss:w/rd?#%20 'x'";
const DB_NAME: &str = "fhir";
const CREDENTIALS_SECRET: &str = "patients-db";
/// How long hfs, nginx and each request may take.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Real tools

struct Tool {
    name: &'static str,
    package: &'static str,
}

const NGINX: Tool = Tool { name: "nginx", package: "nginx" };
const CURL: Tool = Tool { name: "curl", package: "curl" };
const OPENSSL: Tool = Tool { name: "openssl", package: "openssl" };
const SETPRIV: Tool = Tool { name: "setpriv", package: "util-linux" };

fn tool(tool: &Tool) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{}` is not installed and this test needs the real one: apt-get install {}",
                tool.name, tool.package
            )
        })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// nobody on Debian: nginx and hfs run unprivileged, as in the pod.
const NOBODY: u32 = 65534;

fn unprivileged(program: &Path) -> Command {
    if !running_as_root() {
        return Command::new(program);
    }
    let mut command = Command::new(tool(&SETPRIV));
    command.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), "--".into()]);
    command.arg(program);
    command
}

fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
    }
}

fn chown_tree(dir: &Path) {
    if !running_as_root() {
        return;
    }
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            chown_tree(&path);
        } else {
            std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown");
        }
    }
}

/// A process in its own group, stopped (TERM, then KILL) when dropped,
/// even when an assertion fails.
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(name: &'static str, mut command: Command, log: PathBuf) -> Service {
        let file = File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Service { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until something accepts connections on `port`.
    fn await_port(&mut self, port: u16) -> Duration {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait().expect("status") {
                panic!("{} exited ({status}) before listening on {port}:\n{}", self.name, self.log());
            }
            assert!(start.elapsed() < PATIENCE, "{} did not listen within {PATIENCE:?}:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: kill has no memory preconditions; the group is this child's own.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// What the operator renders

/// The endpoint under test: flavor helios on PostgreSQL, its public URL the
/// gateway's loopback address, a tier whose write limits let the
/// conformance suite (which writes fast) through.
fn endpoint(public_url: &str) -> FhirEndpoint {
    serde_json::from_value(json!({
        "apiVersion": "fhiroperator.io/v1alpha1", "kind": "FhirEndpoint",
        "metadata": {"name": "patients", "namespace": "clinical", "uid": "0b7c4f8e-1d2a-4c3b-9e5f-6a7b8c9d0e1f"},
        "spec": {
            "publicUrl": public_url,
            "server": {"flavor": "helios", "image": "ghcr.io/heliossoftware/hfs:0.2.7"},
            "database": {"host": "patients-db.clinical.svc", "port": 5432, "name": DB_NAME,
                "credentialsSecret": CREDENTIALS_SECRET, "sslMode": "disable"},
            "auth": {"apiKeys": ["partners"]},
            "rateLimit": {"tier": "conformance"},
        }
    }))
    .expect("a valid FhirEndpoint")
}

fn tier() -> RateLimitTierSpec {
    serde_json::from_value(json!({
        "requestsPerSecond": 200, "burst": 200,
        "write": {"requestsPerSecond": 200, "burst": 200},
        "maxRequestBodySize": "1Mi", "key": "client",
    }))
    .expect("a valid tier")
}

struct Rendered {
    /// The fhir-server container's environment, as rendered.
    env: Vec<EnvVar>,
    /// The gateway's settings in the pod and the ConfigMap's nginx.conf.
    gateway: GatewaySettings,
    nginx_conf: String,
}

fn render(endpoint: &FhirEndpoint) -> Rendered {
    let v = validate::validate(endpoint).expect("the endpoint validates");
    let tier = tier();
    let inputs = Inputs {
        tier: Some(tier.clone()),
        keys: vec![KeySource {
            schedule: "partners".into(),
            secret_name: "partners-keys".into(),
            versions_fingerprint: String::new(),
        }],
        tls_secret: "patients-tls".into(),
        tls_fingerprint: String::new(),
        capabilities: Capabilities { monitoring: false, pdb: PdbApi::V1 },
        images: Images::default(),
        jwks: Vec::new(),
        audit_public_key: None,
        key_hints: None,
    };
    let children =
        build::build(&v, fhir_operator::meta::owner_ref(endpoint), &inputs).expect("the operator builds children");
    let pod = children.deployment.spec.expect("spec").template.spec.expect("pod spec");
    let server = pod.containers.iter().find(|c| c.name == SERVER_CONTAINER).expect("the fhir-server container");
    let nginx_conf = children.gateway_config.data.expect("data")[NGINX_CONF_KEY].clone();
    // The settings the builder renders from: checked by rendering them
    // again, so the loopback copy below differs from the ConfigMap only in
    // what the test overrides.
    let gateway = GatewaySettings {
        public_host: v.public_host.clone(),
        public_port: v.public_port,
        ..pod::gateway_settings(build::limits_from_tier(&tier))
    };
    assert_eq!(gateway::nginx_conf(&gateway).expect("renders"), nginx_conf, "the ConfigMap's nginx.conf");
    Rendered { env: server.env.clone().unwrap_or_default(), gateway, nginx_conf }
}

/// The container's environment as the kubelet would give it, the Secret's
/// values resolved from the test's credentials.
fn resolve(env: &[EnvVar]) -> BTreeMap<String, String> {
    let secret = BTreeMap::from([("username", DB_USER), ("password", DB_PASSWORD)]);
    env.iter()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(value), None) => value.clone(),
                (None, Some(from)) => {
                    let r = from.secret_key_ref.as_ref().unwrap_or_else(|| panic!("{}: not a secretKeyRef", e.name));
                    assert_eq!(r.name, CREDENTIALS_SECRET, "{} comes from the credentials Secret", e.name);
                    secret.get(r.key.as_str()).unwrap_or_else(|| panic!("{}: no key {:?}", e.name, r.key)).to_string()
                }
                other => panic!("{}: unexpected value {other:?}", e.name),
            };
            (e.name.clone(), value)
        })
        .collect()
}

// ---------------------------------------------------------------------------

#[test]
fn helios_behind_the_rendered_gateway_serves_fhir_on_the_public_url() {
    let started = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |what: &'static str, timings: &mut Vec<(&str, Duration)>| {
            timings.push((what, last.elapsed()));
            last = Instant::now();
        }
    };
    let (nginx, curl, openssl) = (tool(&NGINX), tool(&CURL), tool(&OPENSSL));
    let hfs_binary = hfs::binary().unwrap_or_else(|e| panic!("{e:#}")).to_owned();
    let params_dir = hfs::search_parameters_dir().unwrap_or_else(|e| panic!("{e:#}"));
    let python = venv::tool("python").unwrap_or_else(|e| panic!("{e:#}"));
    let sekmet = venv::tool("sekmet").unwrap_or_else(|e| panic!("{e:#}"));
    lap("tools (hfs.sh, venv.sh)", &mut timings);

    // -- PostgreSQL 15: the Secret's user owns the database, and loopback
    // connections other than the harness's own must give its password.
    let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL 15 (Debian package postgresql): {e:#}"));
    let quoted_password = DB_PASSWORD.replace('\'', "''");
    pg.sql("postgres", &format!("CREATE ROLE {DB_USER} LOGIN PASSWORD '{quoted_password}'")).expect("role");
    pg.sql("postgres", &format!("CREATE DATABASE {DB_NAME} OWNER {DB_USER}")).expect("database");
    let hba = pg.dir().join("data/pg_hba.conf");
    std::fs::write(
        &hba,
        "local all all trust\nhost all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("pg_hba.conf");
    postgres::hand_over(&hba).expect("pg_hba.conf to postgres");
    pg.sql("postgres", "SELECT pg_reload_conf()").expect("reload");
    lap("PostgreSQL up", &mut timings);

    // -- What the operator renders, for a public URL on the gateway's port.
    let dir = tempfile::Builder::new().prefix("fhir-helios-").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let gateway_port = postgres::free_port().expect("port");
    let server_port = postgres::free_port().expect("port");
    let public_url = format!("https://localhost:{gateway_port}");
    let rendered = render(&endpoint(&public_url));
    lap("render", &mut timings);
    let mut env = resolve(&rendered.env);
    eprintln!("rendered fhir-server environment (secrets resolved): {:?}", env.keys().collect::<Vec<_>>());

    // Every variable the operator sets is one hfs 0.2.7 knows: its name is
    // in the binary (a misspelt name would be silently ignored by hfs).
    let binary_bytes = std::fs::read(&hfs_binary).expect("read hfs");
    // One pass for where names start, so that the check stays fast.
    let starts: Vec<usize> =
        binary_bytes.windows(4).enumerate().filter(|(_, w)| *w == b"HFS_").map(|(i, _)| i).collect();
    let knows = |name: &str| starts.iter().any(|&i| binary_bytes[i..].starts_with(name.as_bytes()));
    for name in env.keys() {
        assert!(knows(name), "hfs 0.2.7 does not know the variable {name} the operator renders");
    }
    // The check has teeth: plausible names hfs does not read are absent.
    for unknown in ["HFS_PG_DATABASE", "HFS_POSTGRES_HOST"] {
        assert!(!knows(unknown), "{unknown} is in hfs after all");
    }
    drop(binary_bytes);
    lap("rendered names found in hfs", &mut timings);
    assert_eq!(env["HFS_BASE_URL"], public_url, "the public URL reaches hfs as HFS_BASE_URL");
    assert_eq!(env["HFS_STORAGE_BACKEND"], "postgres");
    assert_eq!(env["HFS_PG_DBNAME"], DB_NAME);

    // The only overrides, each for a reason of the loopback set-up:
    let overrides = [
        // In the pod the kubelet's probes reach the server on the pod's IP,
        // hence 0.0.0.0; here it must not listen on the machine's interfaces.
        ("HFS_SERVER_HOST", "127.0.0.1".to_owned()),
        // 8080 inside the pod's own network namespace; here a free port on
        // the shared loopback (the gateway's upstream follows it).
        ("HFS_SERVER_PORT", server_port.to_string()),
        // The spec's database Service name resolves only in the cluster.
        ("HFS_PG_HOST", "127.0.0.1".to_owned()),
        // The test's PostgreSQL listens on a free port, not 5432.
        ("HFS_PG_PORT", pg.port.to_string()),
    ];
    for (name, value) in overrides {
        let old = env.insert(name.to_owned(), value).unwrap_or_else(|| panic!("the operator renders {name}"));
        eprintln!("override {name}: {old:?} -> {:?}", env[name]);
    }

    // -- hfs, unprivileged, with nothing but that environment, in a
    // read-only working directory holding the R4 search parameters (in
    // the image, its working directory's ./data).
    // Linked, not copied (119 MB), into a directory nobody can reach (the
    // cache may be under root's home).
    let work = dir.path().join("hfs");
    std::fs::create_dir_all(work.join("data")).expect("hfs dir");
    let params = "data/search-parameters-r4.json";
    link_or_copy(&params_dir.join(params), &work.join(params));
    link_or_copy(&hfs_binary, &work.join("hfs"));
    let mut command = unprivileged(&work.join("hfs"));
    command.env_clear().envs(&env).current_dir(&work);
    let mut server = Service::start("hfs", command, dir.path().join("hfs.log"));
    let hfs_listening = server.await_port(server_port);
    lap("hfs listening", &mut timings);

    // -- The gateway: the rendered configuration, its files moved into the
    // test's directory (in the pod they are the mounts of the Deployment).
    let gw = dir.path().join("gateway");
    std::fs::create_dir_all(gw.join("keys/partners")).expect("gateway dir");
    std::fs::create_dir_all(gw.join("run")).expect("gateway run dir");
    let path = |p: &str| gw.join(p).to_str().expect("UTF-8 path").to_owned();
    let certificate = fhir_client::issue_certificate(&openssl, &gw, &["DNS:localhost", "IP:127.0.0.1"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ca = certificate.ca.clone();
    std::fs::write(
        gw.join("keys/partners").join(fhir_operator::keyrotation::keys::GATEWAY_MAP_ENTRY),
        gateway::api_keys_map(&[(API_KEY.to_owned(), "partner-a".to_owned())]).expect("key map"),
    )
    .expect("key map");
    let settings = GatewaySettings {
        // A free loopback port rather than 8443 (the shared machine).
        listen: format!("127.0.0.1:{gateway_port}"),
        upstream: format!("127.0.0.1:{server_port}"),
        // The mounts of the TLS Secret, the key Secrets and the emptyDir.
        tls_certificate: path("tls.crt"),
        tls_certificate_key: path("tls.key"),
        api_keys_map: path("keys/*/api-keys.map"),
        temp_dir: path("run"),
        // A file to read on failure; no metrics sidecar listens for syslog.
        access_log: path("access.log"),
        access_log_syslog: None,
        ..rendered.gateway.clone()
    };
    assert!(settings.api_keys_map.ends_with(&format!("*/{}", fhir_operator::keyrotation::keys::GATEWAY_MAP_ENTRY)));
    let conf = gw.join("nginx.conf");
    std::fs::write(&conf, gateway::nginx_conf(&settings).expect("renders")).expect("nginx.conf");
    assert!(rendered.nginx_conf.contains("ssl_protocols TLSv1.3;"));
    chown_tree(&gw);
    let mut command = unprivileged(&nginx);
    command.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
    let mut proxy = Service::start("nginx", command, dir.path().join("nginx.log"));
    proxy.await_port(gateway_port);
    lap("gateway listening", &mut timings);

    let client = Client {
        curl: curl.clone(),
        ca: ca.clone(),
        public_url: public_url.clone(),
        api_key: API_KEY.into(),
        dir: dir.path().into(),
    };
    // hfs listens before its storage is ready: /metadata answers when it is.
    let ready = Instant::now();
    loop {
        let r = client.keyed("GET", "/metadata", None);
        if r.status == 200 {
            assert_eq!(r.json()["resourceType"], "CapabilityStatement");
            break;
        }
        assert!(ready.elapsed() < PATIENCE, "hfs not ready: {} {}\n{}", r.status, r.body, server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hfs serving /metadata through the gateway {:?} after start", hfs_listening + ready.elapsed());
    lap("metadata through the gateway", &mut timings);

    // -- hfs used the rendered database settings: the Secret's user (with
    // its password, which PostgreSQL checks) created hfs's tables.
    let log = server.log();
    assert!(log.contains("storage_backend=postgres"), "hfs did not pick postgres:\n{log}");
    let owners = pg
        .sql(
            DB_NAME,
            "SELECT string_agg(DISTINCT tableowner, ',') || ' ' || count(*) FROM pg_tables WHERE schemaname = 'public'",
        )
        .expect("tables");
    assert!(owners.trim().starts_with(&format!("{DB_USER} ")), "hfs's tables are owned by {owners:?}\n{log}");
    assert!(log.contains("Loaded 1375 SearchParameters"), "hfs read the R4 search parameters:\n{log}");

    // -- TLS 1.3 only, and no API key → 401 (never reaching hfs).
    assert!(client.tls12_refused(), "TLS 1.2 is refused");
    for headers in [vec![], vec![("X-API-Key", "0".repeat(64))]] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        for (method, body) in [("GET", None), ("POST", Some(patient("Nokey")))] {
            let r = client.request(method, "/Patient", &headers, body.as_ref());
            assert_eq!(r.status, 401, "{method} with {headers:?}: {}", r.body);
        }
    }
    lap("TLS and API keys", &mut timings);

    // -- Create: 201 and a Location on the public URL.
    let mut ids = Vec::new();
    for family in ["Abbott", "Baker", "Carter"] {
        let r = client.keyed("POST", "/Patient", Some(&patient(family)));
        assert_eq!(r.status, 201, "create {family}: {}", r.body);
        let location = r.header("Location").unwrap_or_else(|| panic!("no Location: {:?}", r.headers));
        assert!(location.starts_with(&format!("{public_url}/Patient/")), "Location {location}");
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    // A client's forwarded headers are replaced by the gateway: hfs's URLs
    // stay on the public URL.
    let evil = [
        ("X-API-Key", API_KEY),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Port", "80"),
        ("Forwarded", "host=evil.example;proto=http"),
        ("Host", "evil.example"),
    ];
    let r = client.request("POST", "/Patient", &evil, Some(&patient("Dalton")));
    assert_eq!(r.status, 201, "create with forwarded headers: {}", r.body);
    let location = r.header("Location").expect("Location");
    assert!(location.starts_with(&format!("{public_url}/Patient/")), "Location {location}");
    ids.push(r.json()["id"].as_str().expect("id").to_owned());
    assert!(!r.body.contains("evil.example") && !format!("{:?}", r.headers).contains("evil.example"));
    lap("creates", &mut timings);

    // -- Search pages on the public URL, also with forwarded headers.
    for headers in [&[("X-API-Key", API_KEY)][..], &evil[..]] {
        let r = client.request("GET", "/Patient?_count=1", headers, None);
        assert_eq!(r.status, 200, "{}", r.body);
        let bundle = r.json();
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(1), "{bundle}");
        let next = next_link(&bundle).unwrap_or_else(|| panic!("no next link: {bundle}"));
        assert!(next.starts_with(&format!("{public_url}/")), "next {next}");
        for link in bundle["link"].as_array().expect("links") {
            assert!(link["url"].as_str().expect("url").starts_with(&public_url), "{link}");
        }
        assert!(!r.body.contains("evil.example"));
        // The next page itself, fetched by its absolute URL.
        let page2 = client.keyed("GET", next.strip_prefix(&public_url).expect("on the public URL"), None);
        assert_eq!(page2.status, 200, "{}", page2.body);
        assert_eq!(page2.json()["entry"].as_array().map(Vec::len), Some(1));
    }
    lap("search paging", &mut timings);

    // -- fhirpy follows every next page through the gateway over TLS.
    let out = fhir_client::fhirpy_pages(&python, &public_url, API_KEY, &ca).unwrap_or_else(|e| panic!("{e:#}"));
    ids.sort();
    assert_eq!(out["first"], 1, "{out}");
    assert!(out["next"][0].as_str().is_some_and(|n| n.starts_with(&public_url)), "{out}");
    assert_eq!(out["ids"], json!(ids), "fhirpy followed every page");
    eprintln!("fhirpy: {} patients over {} pages of one", ids.len(), ids.len());
    lap("fhirpy paging", &mut timings);

    // -- The sekmet-fhir conformance smoke suite through the gateway.
    let smoke = fhir_client::conformance_smoke(&sekmet, &dir.path().join("sekmet"), &public_url, API_KEY, &ca)
        .unwrap_or_else(|e| panic!("{e:#}\nhfs:\n{}", server.log()));
    eprintln!("{}", smoke.output);
    assert_eq!(smoke.failed, 0, "{}", smoke.output);
    assert!(smoke.passed >= 14, "conformance_smoke ran its steps: {}", smoke.output);
    eprintln!("conformance_smoke: {} passed, {} warning, {} skipped", smoke.passed, smoke.warnings, smoke.skipped);
    lap("conformance_smoke", &mut timings);

    let access = std::fs::read_to_string(gw.join("access.log")).unwrap_or_default();
    assert!(!access.contains(API_KEY), "the access log never holds a key");
    drop(proxy);
    drop(server);
    for (what, took) in &timings {
        eprintln!("timing: {what:<32} {took:>10.2?}");
    }
    eprintln!("timing: {:<32} {:>10.2?}", "total", started.elapsed());
}
