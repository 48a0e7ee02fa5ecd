//! `make bench-gateway`: what token verification costs at the gateway.
//!
//! A real nginx runs the gateway configuration the operator renders (TLS
//! 1.3, limits far above the load) in front of a static upstream (a second
//! nginx answering a small FHIR resource), so that only the gateway's own
//! work differs between the modes:
//! - `api-key`: API keys alone, nginx's key map (no verifier);
//! - `api-key+scopes`: API keys with `spec.auth.clients`, every request
//!   asked of `fhir-operator gateway-auth`;
//! - `token-cached`: one bearer token for every request (verified once,
//!   then found in the verifier's cache);
//! - `token-uncached`: a different token for every request (each signature
//!   checked: ES256).
//!
//! Load: wrk (Debian's), keep-alive connections, `--rounds` runs of
//! `--duration` per mode, in turns; figures are the medians of the rounds.
//! On a small machine wrk, nginx and the verifier share the cores: compare
//! the modes with each other, measured in one run, not with other machines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use fhir_operator::api::SigningAlgorithm;
use fhir_operator::fhirendpoint::build::DEFAULT_LIMITS;
use fhir_operator::fhirendpoint::gateway::{self, GatewayAuth, GatewaySettings, LimitKey, Limits, Rate};
use fhir_operator::gateway_auth::{AuthConfig, IssuerConfig};
use fhir_operator_e2e::postgres::free_port;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Gateway latency and throughput: API keys vs bearer token verification")]
struct Args {
    /// Length of each wrk run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Runs per mode (medians are printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Tokens signed for the uncached mode (more than it sends).
    #[arg(long, default_value_t = 150_000)]
    tokens: usize,
}

const ISSUER: &str = "https://issuer.bench.example";
const CLIENT: &str = "bench-client";
const API_KEY: &str = "b3c6e0b8a9c15224a8228b9a98ca1531d6b2bd0a2c8a5b1f4e6d7c8b9a0f1e2";

struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command, log: &Path) -> Result<Owned> {
    let file = std::fs::File::create(log)?;
    let child = command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).spawn()?;
    Ok(Owned(child))
}

fn await_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().map(|d| d.join("fhir-operator")).unwrap_or_default()
}

/// One mode's figures, from one wrk run.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
}

fn millis(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(out: &str) -> Result<Run> {
    let mut run = Run::default();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => run.p50_ms = millis(v).context("p50")?,
            ["99%", v] => run.p99_ms = millis(v).context("p99")?,
            ["Requests/sec:", v] => run.rps = v.parse()?,
            ["Non-2xx", ..] => bail!("some requests were refused, the figures would not mean anything:\n{out}"),
            _ => {}
        }
    }
    if run.rps == 0.0 {
        bail!("wrk printed no figures:\n{out}");
    }
    Ok(run)
}

const SCRIPT: &str = r#"
-- Each thread sends its own slice of the tokens file (one per line), each
-- token once, or the X-API-Key header when no file is given.
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  tokens = {}
  local file = os.getenv("BENCH_TOKENS")
  if file ~= nil and file ~= "" then
    for line in io.lines(file) do tokens[#tokens + 1] = line end
  end
  local threads = tonumber(os.getenv("BENCH_THREADS"))
  share = math.floor(#tokens / threads)
  offset = id * share
  i = 0
end
function request()
  local headers = {}
  if #tokens > 0 then
    headers["Authorization"] = "Bearer " .. tokens[offset + (i % share) + 1]
    i = i + 1
  else
    headers["X-API-Key"] = os.getenv("BENCH_API_KEY")
  end
  return wrk.format("GET", "/Patient/1", headers)
end
"#;

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new().prefix("fhir-gateway-bench-").tempdir()?;
    let d = dir.path();
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("nginx is needed: apt-get install nginx")?;
    let wrk = PathBuf::from("/usr/bin/wrk");
    if !wrk.is_file() {
        bail!("wrk is needed: apt-get install wrk");
    }

    // The static upstream.
    let upstream_port = free_port()?;
    std::fs::create_dir_all(d.join("upstream"))?;
    let upstream_conf = d.join("upstream.conf");
    std::fs::write(
        &upstream_conf,
        format!(
            "worker_processes 1; pid {dir}/upstream/nginx.pid; error_log stderr crit;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {dir}/upstream; proxy_temp_path {dir}/upstream;\n\
             fastcgi_temp_path {dir}/upstream; uwsgi_temp_path {dir}/upstream; scgi_temp_path {dir}/upstream;\n\
             server {{ listen 127.0.0.1:{upstream_port}; default_type application/fhir+json;\n\
             location / {{ return 200 '{{\"resourceType\":\"Patient\",\"id\":\"1\"}}'; }} }} }}\n",
            dir = d.display()
        ),
    )?;
    let _upstream =
        spawn(Command::new(&nginx).arg("-c").arg(&upstream_conf).args(["-g", "daemon off;"]), &d.join("upstream.log"))?;
    await_port(upstream_port)?;

    // Keys and tokens.
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let key = EncodingKey::from_ec_der(&pair.serialize_der());
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)?;
    jwk.common.key_id = Some("bench".into());
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("bench".into());
    let sign = |jti: usize| {
        let claims = json!({"iss": ISSUER, "aud": "https://localhost", "exp": exp, "jti": jti.to_string(),
            "client_id": CLIENT, "scope": "system/*.rs"});
        jsonwebtoken::encode(&header, &claims, &key)
    };
    let signing = Instant::now();
    let mut tokens = String::new();
    for i in 0..args.tokens {
        tokens.push_str(&sign(i)?);
        tokens.push('\n');
    }
    eprintln!("signed {} ES256 tokens in {:.1?}", args.tokens, signing.elapsed());
    std::fs::write(d.join("tokens-uncached"), &tokens)?;
    std::fs::write(d.join("tokens-cached"), format!("{}\n", sign(usize::MAX)?).repeat(64))?;
    std::fs::write(d.join("bench.lua"), SCRIPT)?;

    // The verifier.
    let auth_port = free_port()?;
    let config = AuthConfig {
        base_path: "/".into(),
        clients: Some([(CLIENT.to_owned(), vec!["system/*.rs".to_owned()])].into_iter().collect()),
        issuers: vec![IssuerConfig {
            issuer: ISSUER.into(),
            audiences: vec!["https://localhost".into()],
            algorithms: vec![SigningAlgorithm::ES256],
            client_claim: "client_id".into(),
            jwks: JwkSet { keys: vec![jwk] },
            refreshable: false,
        }],
        key_hints: None,
    };
    std::fs::write(d.join("auth.json"), serde_json::to_vec(&config)?)?;
    let _verifier = spawn(
        Command::new(operator_binary())
            .args(["gateway-auth", "--config"])
            .arg(d.join("auth.json"))
            .args(["--listen", &format!("127.0.0.1:{auth_port}")])
            .env("RUST_LOG", "warn"),
        &d.join("gateway-auth.log"),
    )?;
    await_port(auth_port)?;

    // Two gateways: without and with the verifier.
    let (cert, key_pem) =
        fhir_operator::fhirendpoint::tls::issue(&["localhost".to_owned()], k8s_openapi::jiff::Timestamp::now())?;
    std::fs::write(d.join("tls.crt"), cert)?;
    std::fs::write(d.join("tls.key"), key_pem)?;
    std::fs::create_dir_all(d.join("keys/bench"))?;
    std::fs::write(
        d.join("keys/bench/api-keys.map"),
        gateway::api_keys_map(&[(API_KEY.to_owned(), CLIENT.to_owned())])?,
    )?;
    let unlimited =
        Limits { key: LimitKey::Client, default: Rate { per_second: 1_000_000, burst: 1_000_000 }, ..DEFAULT_LIMITS };
    let path = |p: &str| d.join(p).display().to_string();
    let mut gateways = Vec::new();
    for (name, verified) in [("plain", false), ("verified", true)] {
        let port = free_port()?;
        std::fs::create_dir_all(d.join(name))?;
        let settings = GatewaySettings {
            listen: format!("127.0.0.1:{port}"),
            upstream: format!("127.0.0.1:{upstream_port}"),
            public_host: "localhost".into(),
            public_port: 443,
            tls_certificate: path("tls.crt"),
            tls_certificate_key: path("tls.key"),
            api_keys_map: path("keys/*/api-keys.map"),
            temp_dir: path(name),
            // As in a pod, every request is logged (to a file here).
            access_log: path(&format!("{name}-access.log")),
            access_log_syslog: None,
            limits: unlimited.clone(),
            auth: verified.then(|| GatewayAuth {
                verifier: format!("127.0.0.1:{auth_port}"),
                base_path: String::new(),
                smart_configuration: None,
            }),
        };
        let conf = d.join(format!("{name}.conf"));
        std::fs::write(&conf, gateway::nginx_conf(&settings)?)?;
        let child = spawn(
            Command::new(&nginx).arg("-c").arg(&conf).args(["-g", "daemon off;"]),
            &d.join(format!("{name}.log")),
        )?;
        await_port(port)?;
        gateways.push((port, child));
    }
    let (plain_port, verified_port) = (gateways[0].0, gateways[1].0);

    let modes: [(&str, u16, Option<&str>); 4] = [
        ("api-key", plain_port, None),
        ("api-key+scopes", verified_port, None),
        ("token-cached", verified_port, Some("tokens-cached")),
        ("token-uncached", verified_port, Some("tokens-uncached")),
    ];
    let threads = 2;
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); modes.len()];
    for round in 0..args.rounds {
        for (i, (mode, port, tokens)) in modes.iter().enumerate() {
            let out = Command::new(&wrk)
                .args(["--latency", "-t", &threads.to_string(), "-c", &args.connections.to_string()])
                .args(["-d", &format!("{}s", args.duration.as_secs().max(1)), "-s"])
                .arg(d.join("bench.lua"))
                .arg(format!("https://127.0.0.1:{port}/"))
                .env("BENCH_TOKENS", tokens.map(&path).unwrap_or_default())
                .env("BENCH_THREADS", threads.to_string())
                .env("BENCH_API_KEY", API_KEY)
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let run = parse_wrk(&text).with_context(|| {
                let log = if *port == plain_port { "plain-access.log" } else { "verified-access.log" };
                let log = std::fs::read_to_string(d.join(log)).unwrap_or_default();
                let refused: Vec<&str> = log.lines().filter(|l| !l.contains("\"status\":200")).take(5).collect();
                format!("mode {mode}: {}\nrefused: {refused:#?}", String::from_utf8_lossy(&out.stderr))
            })?;
            if *mode == "token-uncached" && run.rps * args.duration.as_secs_f64() > args.tokens as f64 {
                bail!("{mode} sent more requests than it has tokens: raise --tokens");
            }
            eprintln!(
                "round {}: {mode:<15} p50 {:.2} ms  p99 {:.2} ms  {:.0} req/s",
                round + 1,
                run.p50_ms,
                run.p99_ms,
                run.rps
            );
            results[i].push(run);
        }
    }
    let median = |mut values: Vec<f64>| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    };
    let base_rps = median(results[0].iter().map(|r| r.rps).collect());
    println!(
        "gateway: {} rounds of {:?} per mode, {} connections, medians; TLS 1.3, static upstream",
        args.rounds, args.duration, args.connections
    );
    println!("{:<16} {:>9} {:>9} {:>10} {:>12}", "mode", "p50 ms", "p99 ms", "req/s", "vs api-key");
    let mut json_rows = Vec::new();
    for ((mode, ..), runs) in modes.iter().zip(&results) {
        let (p50, p99, rps) = (
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            median(runs.iter().map(|r| r.rps).collect()),
        );
        println!("{mode:<16} {p50:>9.2} {p99:>9.2} {rps:>10.0} {:>11.2}x", rps / base_rps);
        json_rows
            .push(json!({"mode": mode, "p50_ms": p50, "p99_ms": p99, "rps": rps, "throughput_ratio": rps / base_rps}));
    }
    println!(
        "{}",
        json!({"benchmark": "gateway-auth", "rounds": args.rounds,
        "duration_seconds": args.duration.as_secs(), "connections": args.connections, "modes": json_rows})
    );
    drop(gateways);
    Ok(())
}
