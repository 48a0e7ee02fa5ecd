//! Pure helpers of the benchmark: percentiles, `/proc` parsing, the JSON
//! and table output. Tested without a cluster.

use std::time::Duration;

/// The nearest-rank percentile `p` (0 to 100) of `samples`; `None` when
/// there are none. Nearest rank, not interpolation: the figure reported is
/// a latency that was measured.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The median of `values` (the lower middle one for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(sorted[(sorted.len() - 1) / 2])
}

/// User plus system CPU time, in clock ticks, from the text of
/// `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may
/// hold spaces, so fields are counted from the last `)`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14, stime 15.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `/proc/<pid>/status` figure in KiB (`VmHWM:` peak, `VmRSS:` now).
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(field)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The three load averages of `/proc/loadavg`, as printed there.
pub fn load_averages(loadavg: &str) -> String {
    loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// One markdown table: a header row and rows of cells.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// Figures with two decimals, comma-separated.
pub fn join(values: &[f64]) -> String {
    values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", ")
}

/// Seconds with two decimals, for tables.
pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let samples = ms(&(1..=200).rev().collect::<Vec<_>>());
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(198)));
        assert_eq!(percentile(&samples, 100.0), Some(Duration::from_millis(200)));
        assert_eq!(percentile(&samples, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&ms(&[7]), 99.0), Some(Duration::from_millis(7)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn cpu_ticks_counts_fields_after_the_name() {
        let stat = "4242 (fhir operator) S 1 4242 4242 0 -1 4194560 5000 0 0 0 1234 567 0 0 20 0 9 0 100 \
                    800000000 20000 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(1234 + 567));
        let odd_name = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 10 20 0 0";
        assert_eq!(cpu_ticks(odd_name), Some(30));
        assert_eq!(cpu_ticks("7 (x) R 1"), None);
        assert_eq!(cpu_ticks(""), None);
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\tfhir-operator\nVmHWM:\t   86432 kB\nVmRSS:\t   70000 kB\n";
        assert_eq!(status_kib(status, "VmHWM:"), Some(86432));
        assert_eq!(status_kib(status, "VmRSS:"), Some(70000));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn load_averages_keeps_the_three_figures() {
        assert_eq!(load_averages("2.07 2.02 2.28 3/512 26627\n"), "2.07 2.02 2.28");
    }

    #[test]
    fn tables_have_a_separator_per_column() {
        let t = table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}
