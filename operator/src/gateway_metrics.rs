//! `fhir-operator gateway-metrics`: the sidecar beside nginx that receives
//! the gateway's JSON access log over syslog (UDP, loopback) and serves it
//! as Prometheus metrics for the endpoint's alerts.

/// Command-line arguments of `fhir-operator gateway-metrics`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {}

/// Runs the sidecar until the process is stopped.
pub async fn run(args: Args) -> std::io::Result<()> {
    let _ = args;
    todo!("gateway metrics sidecar")
}
