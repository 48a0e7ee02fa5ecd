//! `make bench` and `make bench-scale`: the operator against baselines
//! that do the same API work with no controller.
//!
//! Scenarios (`--scenario`, comma-separated; each on fresh control planes):
//! - `ready` (`make bench`): N endpoints until every one is Ready, against
//!   the same children applied by a raw client until every Deployment is
//!   available; both include kube-controller-manager and the stand-in
//!   kubelet (see `ready.rs`).
//! - `children`: N endpoints until every child exists with the expected
//!   content (no pods), against the raw client; with `render-kubectl` also
//!   against `fhir-operator render | kubectl apply --server-side`.
//! - `memory`: RSS at steady state, and peaks of an initial list and of a
//!   relist forced by restarting the API server.
//! - `tier-fanout`, `key-fanout`, `edit-latency`: see `fanout.rs`.
//!
//! Figures go to stdout as a markdown table per scenario and one JSON line
//! per scenario (prefixed `json: `, for comparing runs); progress to stderr.

mod common;
mod fanout;
mod ready;
mod scale;
mod stats;
mod track;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Ready,
    Children,
    Memory,
    TierFanout,
    KeyFanout,
    EditLatency,
    RenderKubectl,
}

#[derive(Parser)]
#[command(about = "The FhirEndpoint controller against no-controller baselines")]
struct Args {
    /// What to measure, one or more.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ready")]
    scenario: Vec<Scenario>,
    /// Numbers of endpoints, one run of each scenario each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    endpoints: Vec<usize>,
    /// Reconciles (operator) and appliers (baseline) in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Alternating baseline and operator runs of `children` and
    /// `tier-fanout`; the tables show medians.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Single-endpoint edits of `edit-latency`.
    #[arg(long, default_value_t = 200)]
    edits: usize,
    /// The time `edit-latency` spreads its edits (and the churn) over.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    edit_window: Duration,
    /// The grace period of the `key-fanout` schedule.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    key_grace: Duration,
    /// kubectl for `render-kubectl`.
    #[arg(long, env = "KUBECTL", default_value = "kubectl")]
    kubectl: String,
}

/// One scenario's figures: a table row and a JSON line.
pub struct Report {
    pub scenario: String,
    pub header: Vec<&'static str>,
    pub row: Vec<String>,
    pub json: serde_json::Value,
}

/// Repeated baseline and operator runs of one size, compared by medians.
pub struct Compared<'a> {
    pub scenario: &'static str,
    pub n: usize,
    pub baseline_s: &'a [f64],
    pub operator_s: &'a [f64],
    pub requests_per_endpoint: &'a [f64],
    pub operator_cpu_s: &'a [f64],
    pub load: (String, String),
}

impl Compared<'_> {
    pub fn report(&self, what_baseline: &'static str, what_operator: &'static str) -> Report {
        let med = |v: &[f64]| stats::median(v).unwrap_or(0.0);
        let (b, o) = (med(self.baseline_s), med(self.operator_s));
        let (before, after) = &self.load;
        Report {
            scenario: self.scenario.into(),
            header: vec![
                "endpoints",
                what_baseline,
                what_operator,
                "ratio",
                "requests/endpoint",
                "operator CPU",
                "runs (baseline / operator)",
                "load before → after",
            ],
            row: vec![
                self.n.to_string(),
                format!("{b:.2} s"),
                format!("{o:.2} s"),
                format!("{:.2}", o / b),
                format!("{:.1}", med(self.requests_per_endpoint)),
                format!("{:.1} s", med(self.operator_cpu_s)),
                format!("{} / {}", stats::join(self.baseline_s), stats::join(self.operator_s)),
                format!("{before} → {after}"),
            ],
            json: serde_json::json!({"scenario": self.scenario, "endpoints": self.n,
                "baseline_s": self.baseline_s, "operator_s": self.operator_s, "ratio": o / b,
                "requests_per_endpoint": self.requests_per_endpoint, "operator_cpu_s": self.operator_cpu_s,
                "controller_manager": false, "load_before": before, "load_after": after}),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut reports: Vec<Report> = Vec::new();
    let wants = |s: Scenario| args.scenario.contains(&s);
    let mut failed = Vec::new();
    for &n in &args.endpoints {
        let mut done = |name: &str, result: Result<Vec<Report>>| match result {
            Ok(rs) => {
                for r in rs {
                    println!("json: {}", r.json);
                    eprintln!("{}", stats::table(&r.header, std::slice::from_ref(&r.row)));
                    reports.push(r);
                }
            }
            // One scenario failing does not lose the others' figures.
            Err(e) => {
                eprintln!("bench: {name} at {n} endpoints failed: {e:#}");
                failed.push(format!("{name} at {n}"));
            }
        };
        if wants(Scenario::Ready) {
            eprintln!("bench: ready, {n} endpoints, concurrency {}", args.concurrency);
            done("ready", runtime.block_on(ready::run_one(n, args.concurrency)).map(|f| vec![ready::report(&f)]));
        }
        if wants(Scenario::Children) || wants(Scenario::RenderKubectl) {
            let kubectl = wants(Scenario::RenderKubectl).then_some(args.kubectl.as_str());
            done("children", runtime.block_on(scale::children(n, args.concurrency, args.repeats, kubectl)));
        }
        if wants(Scenario::Memory) {
            done("memory", runtime.block_on(scale::memory(n, args.concurrency)).map(|r| vec![r]));
        }
        if wants(Scenario::TierFanout) {
            done("tier-fanout", runtime.block_on(fanout::tier(n, args.concurrency, args.repeats)).map(|r| vec![r]));
        }
        if wants(Scenario::KeyFanout) {
            done("key-fanout", runtime.block_on(fanout::keys(n, args.concurrency, args.key_grace)).map(|r| vec![r]));
        }
        if wants(Scenario::EditLatency) {
            let edits = fanout::edits(n, args.concurrency, args.edits, args.edit_window);
            done("edit-latency", runtime.block_on(edits).map(|r| vec![r]));
        }
    }
    // One table per scenario, rows in the order run.
    let mut scenarios: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let rows: Vec<&Report> = reports.iter().filter(|r| r.scenario == scenario).collect();
        let cells: Vec<Vec<String>> = rows.iter().map(|r| r.row.clone()).collect();
        println!("\n{scenario}:\n{}", stats::table(&rows[0].header, &cells));
    }
    if !failed.is_empty() {
        anyhow::bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
