//! `fhir-operator audit verify` and `fhir-operator audit query`.

use std::path::PathBuf;

use super::checkpoint::parse_public_key;
use super::query::{Filter, query};
use super::record::parse_time;
use super::store::{AuditStore, DestinationArgs};
use super::summary::Summary;
use super::verify::{Report, verify};

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Check every signature, segment, record link and gap of the trail;
    /// exits non-zero naming the first broken segment and record.
    Verify(VerifyArgs),
    /// Print a client's or a patient's records in a time range, as JSON lines.
    Query(QueryArgs),
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub destination: DestinationArgs,
    /// The endpoint's Ed25519 public key: SubjectPublicKeyInfo PEM, or its
    /// 32 bytes in base64 (with `--dir` or `--s3-bucket`).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["endpoint", "public_key_base64"])]
    pub public_key: Option<PathBuf>,
    /// The public key itself, as its 32 bytes in base64 (`status.audit.publicKey`):
    /// how the operator's verification Job is given it, in its immutable
    /// spec rather than from a mounted object that could change under it.
    #[arg(long, value_name = "BASE64", conflicts_with_all = ["public_key", "endpoint"])]
    pub public_key_base64: Option<String>,
    /// A FhirEndpoint with `spec.audit` (S3): its destination, credentials
    /// and public key are read from the cluster of the kubeconfig.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["public_key", "dir", "s3_bucket"])]
    pub endpoint: Option<String>,
    /// The endpoint's namespace (default: the kubeconfig's).
    #[arg(long, short = 'n', value_name = "NAMESPACE", requires = "endpoint")]
    pub namespace: Option<String>,
    /// Only this stream (one gateway pod's chain); default every stream.
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also write a small JSON summary (counts, last checkpoint, the first
    /// broken segment and record; never key material or record content)
    /// here, e.g. `/dev/termination-log` in a Job the operator reads.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("who").required(true).multiple(true).args(["client", "patient"]))]
pub struct QueryArgs {
    #[command(flatten)]
    pub destination: DestinationArgs,
    /// Records of this client id.
    #[arg(long, value_name = "ID")]
    pub client: Option<String>,
    /// Records whose URL named this patient (`Patient/<id>...`).
    #[arg(long, value_name = "ID")]
    pub patient: Option<String>,
    /// From this time on (RFC 3339, e.g. 2025-03-07T00:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Before this time (RFC 3339).
    #[arg(long, value_name = "TIME", value_parser = time_arg)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    #[arg(long, value_name = "NAME")]
    pub stream: Option<String>,
}

fn time_arg(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    parse_time(text).ok_or_else(|| format!("{text:?} is not an RFC 3339 time such as 2025-03-07T00:00:00Z"))
}

pub async fn run(args: AuditArgs) -> Result<(), String> {
    match args.command {
        AuditCommand::Verify(args) => run_verify(args).await,
        AuditCommand::Query(args) => {
            let store = AuditStore::open(&args.destination).map_err(|e| e.to_string())?;
            let filter = Filter {
                client: args.client,
                patient: args.patient,
                since: args.since,
                until: args.until,
                stream: args.stream,
            };
            let mut out = std::io::stdout().lock();
            let matched = query(&store, &filter, |record| {
                use std::io::Write;
                let _ = writeln!(out, "{}", serde_json::to_string(record).unwrap_or_default());
            })
            .await
            .map_err(|e| e.to_string())?;
            eprintln!("{matched} records");
            Ok(())
        }
    }
}

/// The store and public key of a FhirEndpoint's trail, from the cluster.
async fn endpoint_trail(name: &str, namespace: Option<&str>) -> Result<(AuditStore, String), String> {
    use crate::fhirendpoint::audit_check::{Verification, open_destination};
    crate::install_tls_provider();
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes client configuration: {e}"))?;
    let namespace = namespace.map(str::to_owned).unwrap_or_else(|| client.default_namespace().to_owned());
    let endpoints: kube::Api<crate::api::FhirEndpoint> = kube::Api::namespaced(client.clone(), &namespace);
    let endpoint = endpoints.get(name).await.map_err(|e| format!("FhirEndpoint {namespace}/{name}: {e}"))?;
    let v = crate::fhirendpoint::validate::validate(&endpoint).map_err(|e| e.to_string())?;
    let audit = v.audit.ok_or_else(|| format!("FhirEndpoint {namespace}/{name} has no spec.audit"))?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(client.clone(), &namespace);
    let key_secret = crate::fhirendpoint::audit::signing_key_secret(name);
    let public = secrets
        .get(&key_secret)
        .await
        .map_err(|e| format!("Secret {namespace}/{key_secret}: {e}"))?
        .data
        .and_then(|d| d.get(super::PUBLIC_KEY_ENTRY).and_then(|b| String::from_utf8(b.0.clone()).ok()))
        .ok_or_else(|| format!("Secret {namespace}/{key_secret} has no {}", super::PUBLIC_KEY_ENTRY))?;
    let store = open_destination(&client, &namespace, &audit).await.map_err(|why| match why {
        Verification::NotVerifiable(m) | Verification::Pending(m) | Verification::Unreadable(m) => m,
        Verification::Verified { .. } => String::new(),
    })?;
    Ok((store, public))
}

async fn run_verify(args: VerifyArgs) -> Result<(), String> {
    let result = verify_and_report(&args).await;
    if let Some(file) = &args.summary {
        let summary = match &result {
            Ok(report) => Summary::from_report(report),
            Err(e) => Summary::error(e),
        };
        if let Err(e) = std::fs::write(file, summary.to_message()) {
            eprintln!("fhir-operator: cannot write the summary to {}: {e}", file.display());
        }
    }
    let report = result?;
    if report.ok() {
        return Ok(());
    }
    let broken: Vec<String> =
        report.streams.iter().filter_map(|s| s.problem.as_ref().map(|p| format!("stream {}: {p}", s.stream))).collect();
    if broken.is_empty() {
        return Err(format!("{}: no audit stream found", report.destination));
    }
    Err(format!("the audit trail does not verify: {}", broken.join("; ")))
}

/// Verifies and prints the report.
async fn verify_and_report(args: &VerifyArgs) -> Result<Report, String> {
    let (store, text) = match (&args.endpoint, &args.public_key, &args.public_key_base64) {
        (Some(endpoint), ..) => endpoint_trail(endpoint, args.namespace.as_deref()).await?,
        (None, Some(file), _) => {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("reading the public key {}: {e}", file.display()))?;
            (AuditStore::open(&args.destination).map_err(|e| e.to_string())?, text)
        }
        (None, None, Some(key)) => (AuditStore::open(&args.destination).map_err(|e| e.to_string())?, key.clone()),
        (None, None, None) => return Err("--public-key or --endpoint is required".into()),
    };
    let key = parse_public_key(&text).map_err(|e| format!("the public key: {e}"))?;
    let report = verify(&store, &key, args.stream.as_deref()).await.map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", describe(&report));
    }
    Ok(report)
}

/// The text report: what was checked, per stream.
pub fn describe(report: &Report) -> String {
    let mut out = format!("destination: {}\n", report.destination);
    for s in &report.streams {
        out.push_str(&format!(
            "stream {}: {} checkpoints ({} signatures verified), {} segments, {} records, seq {}..={}",
            s.stream, s.checkpoints, s.signatures, s.segments, s.records, s.first_seq, s.last_seq
        ));
        if !s.first_time.is_empty() {
            out.push_str(&format!(", records from {} to {}", s.first_time, s.last_time));
        }
        out.push_str(&format!(
            ", last seal {}, longest period between seals {} s\n",
            s.last_seal, s.longest_period_seconds
        ));
        if let Some(p) = &s.pruned {
            out.push_str(&format!(
                "  retention pruned checkpoints 1..={} (records up to seq {}) sealed before {}, decided {}\n",
                p.through_index, p.through_seq, p.before, p.at
            ));
        }
        if s.awaiting_deletion > 0 {
            out.push_str(&format!(
                "  {} pruned objects still present (deleted at the next pruning)\n",
                s.awaiting_deletion
            ));
        }
        for name in &s.unsealed {
            out.push_str(&format!("  {name}: after the last checkpoint (a seal in progress)\n"));
        }
        for reset in &s.source_resets {
            out.push_str(&format!("  warning: {reset}\n"));
        }
        match &s.problem {
            Some(problem) => out.push_str(&format!("  BROKEN: {problem}\n")),
            None => out.push_str("  OK\n"),
        }
    }
    out
}
