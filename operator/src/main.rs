use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fhir_operator::api;

/// Kubernetes operator for managed healthcare (FHIR) API deployments.
#[derive(Parser)]
#[command(name = "fhir-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controllers (the operator's main job).
    Run(fhir_operator::run::RunArgs),
    /// Print the children each FhirEndpoint in the files would get, offline.
    Render(fhir_operator::render::RenderArgs),
    /// Sidecar: serve the gateway's access log as Prometheus metrics.
    GatewayMetrics(fhir_operator::gateway_metrics::Args),
    /// Sidecar: verify API keys' scopes and OAuth bearer tokens for nginx's auth_request.
    GatewayAuth(fhir_operator::gateway_auth::Args),
    /// Sidecar: follow the gateway's access log into the signed audit trail, and serve its metrics.
    AuditSidecar(fhir_operator::audit::sidecar::SidecarArgs),
    /// Read the audit trail: `verify` it end to end, or `query` it.
    Audit(fhir_operator::audit::cli::AuditArgs),
    /// Inside a backup or restore drill Job: encrypt and upload, fetch, verify.
    BackupAgent(fhir_operator::backup::agent::AgentArgs),
    /// Recover: restore a backup into a database you name, and verify it.
    Restore(fhir_operator::backup::restore::RestoreArgs),
    /// Print the CustomResourceDefinitions of every kind, as YAML.
    Crds {
        /// Write one file per kind into this directory instead (`crds/`);
        /// repeat for several (the Helm chart's `crds/` too).
        #[arg(long, value_name = "DIR")]
        out_dir: Vec<PathBuf>,
    },
    /// Print the Helm chart's RBAC rules template, generated from the operator's rules.
    ChartRbac {
        /// Write it to this file instead (`charts/fhir-operator/templates/_rules.tpl`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fhir_operator::install_tls_provider();
    let result = match cli.command {
        Command::Crds { out_dir } => print_crds(out_dir),
        Command::ChartRbac { out } => {
            let text = fhir_operator::chart::rules_template(fhir_operator::rbac::RULES);
            match out {
                Some(path) => std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display())),
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        Command::Render(args) => {
            fhir_operator::render::render(&args).map(|out| print!("{out}")).map_err(|e| e.to_string())
        }
        Command::Run(args) => block_on(fhir_operator::run::run(args)).map_err(|e| e.to_string()),
        Command::BackupAgent(args) => block_on(fhir_operator::backup::agent::run(args)),
        Command::Restore(args) => block_on(async {
            let restored = fhir_operator::backup::restore::restore(&args).await.map_err(|e| e.to_string())?;
            println!("{}", serde_json::to_string(&restored).unwrap_or_default());
            eprintln!(
                "restored backup {}: {} tables, {} rows, verified against its manifest; pg_restore took {:.1} s",
                restored.backup, restored.tables, restored.rows, restored.restore_seconds
            );
            Ok::<(), String>(())
        }),
        Command::AuditSidecar(args) => block_on(async {
            fhir_operator::telemetry::init();
            fhir_operator::audit::sidecar::run(args).await
        })
        .map_err(|e| e.to_string()),
        Command::Audit(args) => block_on(fhir_operator::audit::cli::run(args)),
        Command::GatewayMetrics(args) => block_on(async {
            fhir_operator::telemetry::init();
            fhir_operator::gateway_metrics::run(args).await
        })
        .map_err(|e| e.to_string()),
        Command::GatewayAuth(args) => block_on(async {
            fhir_operator::telemetry::init();
            fhir_operator::gateway_auth::run(args).await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fhir-operator: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(future),
        Err(e) => {
            eprintln!("fhir-operator: error: cannot start the Tokio runtime: {e}");
            std::process::exit(1)
        }
    }
}

fn print_crds(out_dirs: Vec<PathBuf>) -> Result<(), String> {
    for (stem, crd) in api::crds() {
        let text = api::crd_yaml(&crd).map_err(|e| format!("rendering the {stem} CRD: {e}"))?;
        if out_dirs.is_empty() {
            print!("{text}");
        }
        for dir in &out_dirs {
            let path = dir.join(format!("{stem}.yaml"));
            std::fs::write(&path, &text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
    }
    Ok(())
}
