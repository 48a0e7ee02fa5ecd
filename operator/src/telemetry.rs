//! JSON logs on stdout, one object per line; `RUST_LOG` filters (default
//! `info`). Spans (one per reconcile) are included in every line.

use tracing_subscriber::{EnvFilter, fmt};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt().json().with_env_filter(filter).with_current_span(true).with_span_list(false).try_init();
}
