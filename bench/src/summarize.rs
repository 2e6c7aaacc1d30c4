//! `summarize`: turns the `--json` lines of several runs into a Markdown
//! table comparing the primary label (`parlor`) with baselines (by default
//! `uws`, `node` and `jetstream`): a column of values for each, then the
//! ratio primary ÷ baseline for each. A baseline none of whose runs is in the
//! input gets no columns. With `--targets`, a list after the table says which of
//! the core's targets (paced, burst, idle, persist on SQLite and on PostgreSQL, against
//! uWS and JetStream where a target is relative) the run meets. With `--median`, a figure
//! that several runs of one label report is their median (the suite's repeated runs).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Files of JSON lines written by `--json` runs ("-" or nothing: stdin).
    pub files: Vec<PathBuf>,
    /// Label of the system under test.
    #[arg(long, default_value = "parlor")]
    pub primary: String,
    /// A baseline's label and, after `=`, its column name (repeatable; by
    /// default `uws=uWS`, `node=ws` and `jetstream=JetStream`).
    #[arg(long = "baseline", value_name = "LABEL[=NAME]")]
    pub baselines: Vec<String>,
    /// Text for the "date" column.
    #[arg(long, default_value = "")]
    pub date: String,
    /// Text for the "machine" column.
    #[arg(long, default_value = "")]
    pub machine: String,
    /// After the table, check the figures against the targets ([`TARGETS`]).
    #[arg(long)]
    pub targets: bool,
    /// A figure reported by several runs of one label is their median (the mean of the
    /// middle two for an even count); without it, the last run's.
    #[arg(long)]
    pub median: bool,
}

/// What a target asks of Parlor's figure.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// At most this value.
    Max(f64),
    /// At least this value.
    Min(f64),
    /// At most this share of the baseline's figure (label, share).
    MaxShareOf(&'static str, f64),
    /// At least this share of the baseline's figure (label, share).
    MinShareOf(&'static str, f64),
}

/// One target: the figures it applies to (names starting with `scenario` and ending with
/// `figure`), and the rule.
struct Target {
    text: &'static str,
    scenario: &'static str,
    figure: &'static str,
    rule: Rule,
}

/// The core's targets, as `bench/run.sh` measures them (BENCHMARKS.md).
const TARGETS: &[Target] = &[
    Target {
        text: "paced: latency p99 at most 15 ms",
        scenario: "fanout paced",
        figure: ": latency p99 (ms)",
        rule: Rule::Max(15.0),
    },
    Target {
        text: "paced: server CPU per delivery at most uWS's",
        scenario: "fanout paced",
        figure: ": server CPU-s per 1M deliveries",
        rule: Rule::MaxShareOf("uws", 1.0),
    },
    Target {
        text: "burst: deliveries/s at least uWS's",
        scenario: "fanout burst",
        figure: ": deliveries/s",
        rule: Rule::MinShareOf("uws", 1.0),
    },
    Target {
        text: "burst: server CPU per delivery at most uWS's",
        scenario: "fanout burst",
        figure: ": server CPU-s per 1M deliveries",
        rule: Rule::MaxShareOf("uws", 1.0),
    },
    Target {
        text: "idle: RSS per joined connection at most 2 KiB",
        scenario: "idle",
        figure: ": server RSS per connection (KiB)",
        rule: Rule::Max(2.0),
    },
    Target {
        text: "persist: at least 40,000 acked msgs/s",
        scenario: "persist",
        figure: ": acked msgs/s",
        rule: Rule::Min(40_000.0),
    },
    Target {
        text: "persist: at least half of JetStream's acked msgs/s",
        scenario: "persist",
        figure: ": acked msgs/s",
        rule: Rule::MinShareOf("jetstream", 0.5),
    },
    Target {
        text: "persist: ack p99 at most 10 ms",
        scenario: "persist",
        figure: ": ack latency p99 (ms)",
        rule: Rule::Max(10.0),
    },
    Target {
        text: "persist on PostgreSQL: at least 15,000 acked msgs/s",
        scenario: "PostgreSQL persist",
        figure: ": acked msgs/s",
        rule: Rule::Min(15_000.0),
    },
];

#[derive(Debug, Deserialize)]
struct Line {
    label: String,
    #[serde(default)]
    scenario: String,
    #[serde(default)]
    mode: Option<String>,
    figures: BTreeMap<String, f64>,
    #[serde(default)]
    machine_quiet: Option<bool>,
    #[serde(default)]
    other_cpu_seconds: Option<f64>,
    #[serde(default)]
    client_saturated: Option<bool>,
}

pub fn run(args: &SummarizeArgs) -> Result<()> {
    let mut text = String::new();
    if args.files.is_empty() || args.files.iter().any(|f| f.as_os_str() == "-") {
        for line in std::io::stdin().lock().lines() {
            text += &line.context("reading stdin")?;
            text.push('\n');
        }
    }
    for file in args.files.iter().filter(|f| f.as_os_str() != "-") {
        text += &std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        text.push('\n');
    }
    print!("{}", table(&text, args));
    Ok(())
}

/// The baselines compared when none is named.
const DEFAULT_BASELINES: [&str; 3] = ["uws=uWS", "node=ws", "jetstream=JetStream"];

/// `(label, column name)` of each baseline, in column order.
fn baselines(args: &SummarizeArgs) -> Vec<(String, String)> {
    let specs: Vec<&str> = if args.baselines.is_empty() {
        DEFAULT_BASELINES.to_vec()
    } else {
        args.baselines.iter().map(String::as_str).collect()
    };
    specs
        .into_iter()
        .map(|spec| match spec.split_once('=') {
            Some((label, name)) => (label.to_owned(), name.to_owned()),
            None => (spec.to_owned(), spec.to_owned()),
        })
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Builds the Markdown table. Lines that are not summaries are skipped; a
/// later figure of the same label and name replaces an earlier one, or with
/// `--median` all of them give their median.
fn table(text: &str, args: &SummarizeArgs) -> String {
    let baselines = baselines(args);
    // figure -> [primary, baseline 1, baseline 2, …] runs' values, in first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut runs: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    let mut notes = Vec::new();
    for line in text.lines() {
        let Ok(line) = serde_json::from_str::<Line>(line.trim()) else {
            continue;
        };
        let run = match &line.mode {
            Some(mode) => format!("{} {} {mode}", line.label, line.scenario),
            None => format!("{} {}", line.label, line.scenario),
        };
        if line.machine_quiet == Some(false) {
            notes.push(format!(
                "- {run}: other processes used {:.2} CPU-s meanwhile; figures skewed.",
                line.other_cpu_seconds.unwrap_or(0.0)
            ));
        }
        if line.client_saturated == Some(true) {
            notes.push(format!(
                "- {run}: the load generator was CPU-bound; throughput is a lower bound."
            ));
        }
        let column = if line.label == args.primary {
            0
        } else if let Some(i) = baselines.iter().position(|(label, _)| *label == line.label) {
            i + 1
        } else {
            continue;
        };
        for (name, value) in line.figures {
            let entry = runs.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                vec![Vec::new(); baselines.len() + 1]
            });
            if !args.median {
                entry[column].clear();
            }
            entry[column].push(value);
        }
    }
    let values: BTreeMap<String, Vec<Option<f64>>> = runs
        .into_iter()
        .map(|(name, columns)| (name, columns.iter().map(|v| median(v)).collect()))
        .collect();
    // Baselines with at least one figure, as (column index, name).
    let shown: Vec<(usize, &str)> = baselines
        .iter()
        .enumerate()
        .map(|(i, (_, name))| (i + 1, name.as_str()))
        .filter(|&(i, _)| values.values().any(|v| v[i].is_some()))
        .collect();
    let mut out = String::from("| date | machine | figure | Parlor |");
    for (_, name) in &shown {
        out += &format!(" {name} |");
    }
    for (_, name) in &shown {
        out += &format!(" Parlor ÷ {name} |");
    }
    out += "\n|---|---|---|---:|";
    out += &"---:|".repeat(shown.len() * 2);
    out.push('\n');
    for name in order {
        let row = values.get(&name).cloned().unwrap_or_default();
        let primary = row.first().copied().flatten();
        out += &format!(
            "| {} | {} | {} | {} |",
            args.date,
            args.machine,
            name,
            fmt(primary)
        );
        for &(i, _) in &shown {
            out += &format!(" {} |", fmt(row.get(i).copied().flatten()));
        }
        for &(i, _) in &shown {
            let ratio = match (primary, row.get(i).copied().flatten()) {
                (Some(p), Some(b)) if b != 0.0 => format!("{:.2}", p / b),
                _ => "–".to_owned(),
            };
            out += &format!(" {ratio} |");
        }
        out.push('\n');
    }
    if !notes.is_empty() {
        out += "\n";
        for note in notes {
            out += &note;
            out.push('\n');
        }
    }
    if args.targets {
        out += &targets(&values, &baselines);
    }
    out
}

/// The value of baseline `label` in `row`, and the baseline's column name.
fn baseline_of<'a>(
    row: &[Option<f64>],
    baselines: &'a [(String, String)],
    label: &str,
) -> Option<(f64, &'a str)> {
    let i = baselines.iter().position(|(l, _)| l == label)?;
    Some((row.get(i + 1).copied().flatten()?, baselines[i].1.as_str()))
}

/// The targets' lines: each figure a target applies to, its value, what it is held
/// against, and whether it is met.
fn targets(values: &BTreeMap<String, Vec<Option<f64>>>, baselines: &[(String, String)]) -> String {
    let mut out = String::from("\ntargets:\n");
    for target in TARGETS {
        let figures = values
            .iter()
            .filter(|(name, _)| name.starts_with(target.scenario) && name.ends_with(target.figure));
        let mut any = false;
        for (_, row) in figures {
            let Some(value) = row.first().copied().flatten() else {
                continue;
            };
            any = true;
            let (met, against) = match target.rule {
                Rule::Max(limit) => (value <= limit, String::new()),
                Rule::Min(limit) => (value >= limit, String::new()),
                Rule::MaxShareOf(label, share) | Rule::MinShareOf(label, share) => {
                    match baseline_of(row, baselines, label) {
                        Some((b, name)) => {
                            let at_most = matches!(target.rule, Rule::MaxShareOf(..));
                            let met = if at_most {
                                value <= b * share
                            } else {
                                value >= b * share
                            };
                            (
                                met,
                                format!(" against {name}'s {} ({:.2}×)", fmt(Some(b)), value / b),
                            )
                        }
                        None => {
                            out += &format!(
                                "- {}: {} (no {label} run to compare)\n",
                                target.text,
                                fmt(Some(value))
                            );
                            continue;
                        }
                    }
                }
            };
            out += &format!(
                "- {}: {}{against}: {}\n",
                target.text,
                fmt(Some(value)),
                if met { "met" } else { "NOT met" }
            );
        }
        if !any {
            out += &format!("- {}: not measured\n", target.text);
        }
    }
    out
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(baselines: &[&str]) -> SummarizeArgs {
        SummarizeArgs {
            files: Vec::new(),
            primary: "parlor".into(),
            baselines: baselines.iter().map(|&b| b.to_owned()).collect(),
            date: "d".into(),
            machine: "m".into(),
            targets: false,
            median: false,
        }
    }

    #[test]
    fn median_of_repeated_runs() {
        let text = r#"
{"scenario":"pusher-fanout","label":"parlor","figures":{"f":3.0}}
{"scenario":"pusher-fanout","label":"parlor","figures":{"f":1.0}}
{"scenario":"pusher-fanout","label":"parlor","figures":{"f":2.0}}
{"scenario":"pusher-fanout","label":"soketi","figures":{"f":4.0}}
{"scenario":"pusher-fanout","label":"soketi","figures":{"f":8.0}}
"#;
        let t = table(
            text,
            &SummarizeArgs {
                median: true,
                ..args(&["soketi=Soketi"])
            },
        );
        assert!(t.contains("| d | m | f | 2.00 | 6.00 | 0.33 |"), "{t}");
        // Without --median, the last run counts.
        let t = table(text, &args(&["soketi=Soketi"]));
        assert!(t.contains("| d | m | f | 2.00 | 8.00 | 0.25 |"), "{t}");
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn targets_say_what_is_met() {
        let text = r#"
{"scenario":"fanout","label":"parlor","figures":{"fanout paced 30/s, 10 subs × 5 msgs: latency p99 (ms)":11.4,"fanout paced 30/s, 10 subs × 5 msgs: server CPU-s per 1M deliveries":7.7,"idle, 10 conns in 1 rooms: server RSS per connection (KiB)":4.6}}
{"scenario":"fanout","label":"uws","figures":{"fanout paced 30/s, 10 subs × 5 msgs: server CPU-s per 1M deliveries":7.7}}
{"scenario":"persist","label":"parlor","figures":{"persist 10 senders × 5 msgs, window 1: acked msgs/s":30000.0}}
{"scenario":"jetstream","label":"jetstream","figures":{"persist 10 senders × 5 msgs, window 1: acked msgs/s":50000.0}}
{"scenario":"persist","label":"parlor","machine_quiet":null,"figures":{"PostgreSQL persist 10 senders × 5 msgs, window 1: acked msgs/s":16000.0}}
"#;
        let t = table(
            text,
            &SummarizeArgs {
                targets: true,
                ..args(&[])
            },
        );
        for line in [
            "- paced: latency p99 at most 15 ms: 11.4: met",
            "- paced: server CPU per delivery at most uWS's: 7.70 against uWS's 7.70 (1.00×): met",
            "- idle: RSS per joined connection at most 2 KiB: 4.60: NOT met",
            "- persist: at least 40,000 acked msgs/s: 30000: NOT met",
            "- persist: at least half of JetStream's acked msgs/s: 30000 against JetStream's 50000 (0.60×): met",
            "- burst: deliveries/s at least uWS's: not measured",
            "- persist: ack p99 at most 10 ms: not measured",
            "- persist on PostgreSQL: at least 15,000 acked msgs/s: 16000: met",
        ] {
            assert!(t.contains(line), "{line}\n{t}");
        }
        // PostgreSQL's figure is held to its own target only.
        assert!(!t.contains("acked msgs/s: 16000: NOT met"), "{t}");
        assert!(!t.contains("16000 against"), "{t}");
        assert!(!table(text, &args(&[])).contains("targets:"));
    }

    #[test]
    fn pairs_labels_and_computes_ratios() {
        let text = r#"
progress noise
{"scenario":"fanout","label":"parlor","figures":{"a: deliveries/s":200000.0,"only parlor":1.5}}
{"scenario":"fanout","label":"node","mode":"burst","figures":{"a: deliveries/s":100000.0},"machine_quiet":false,"other_cpu_seconds":1.5}
{"scenario":"fanout","label":"other","figures":{"a: deliveries/s":1.0}}
"#;
        let t = table(text, &args(&["node"]));
        assert!(
            t.contains("| date | machine | figure | Parlor | node | Parlor ÷ node |"),
            "{t}"
        );
        assert!(
            t.contains("| d | m | a: deliveries/s | 200000 | 100000 | 2.00 |"),
            "{t}"
        );
        assert!(t.contains("| d | m | only parlor | 1.50 | – | – |"), "{t}");
        assert!(
            t.contains("- node fanout burst: other processes used 1.50 CPU-s"),
            "{t}"
        );
        assert_eq!(t.lines().count(), 6, "{t}");
    }

    #[test]
    fn default_baselines_get_columns_only_when_they_ran() {
        let text = r#"
{"scenario":"fanout","label":"parlor","figures":{"f":300.0}}
{"scenario":"fanout","label":"uws","figures":{"f":600.0}}
{"scenario":"fanout","label":"node","figures":{"f":100.0}}
{"scenario":"persist","label":"parlor","figures":{"p":50.0}}
"#;
        let t = table(text, &args(&[]));
        assert!(
            t.contains(
                "| date | machine | figure | Parlor | uWS | ws | Parlor ÷ uWS | Parlor ÷ ws |"
            ),
            "{t}"
        );
        assert!(t.contains("|---|---|---|---:|---:|---:|---:|---:|"), "{t}");
        assert!(
            t.contains("| d | m | f | 300 | 600 | 100 | 0.50 | 3.00 |"),
            "{t}"
        );
        assert!(t.contains("| d | m | p | 50.0 | – | – | – | – |"), "{t}");

        let with_js = format!(
            "{text}{}\n",
            r#"{"scenario":"jetstream","label":"jetstream","figures":{"p":25.0}}"#
        );
        let t = table(&with_js, &args(&[]));
        assert!(
            t.contains("| Parlor ÷ uWS | Parlor ÷ ws | Parlor ÷ JetStream |"),
            "{t}"
        );
        assert!(
            t.contains("| d | m | p | 50.0 | – | – | 25.0 | – | – | 2.00 |"),
            "{t}"
        );
    }
}
