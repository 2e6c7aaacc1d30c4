//! `summarize`: turns the `--json` lines of several runs into a Markdown
//! table comparing two labels (by default `parlor` and `node`), with the
//! ratio primary ÷ baseline for every figure both reported.

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
    /// Label of the baseline.
    #[arg(long, default_value = "node")]
    pub baseline: String,
    /// Text for the "date" column.
    #[arg(long, default_value = "")]
    pub date: String,
    /// Text for the "machine" column.
    #[arg(long, default_value = "")]
    pub machine: String,
}

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

/// Builds the Markdown table. Lines that are not summaries are skipped; a
/// later figure of the same label and name replaces an earlier one.
fn table(text: &str, args: &SummarizeArgs) -> String {
    // figure -> (primary, baseline), in first-seen order.
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
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
        let primary = line.label == args.primary;
        if !primary && line.label != args.baseline {
            continue;
        }
        for (name, value) in line.figures {
            let entry = values.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                (None, None)
            });
            if primary {
                entry.0 = Some(value);
            } else {
                entry.1 = Some(value);
            }
        }
    }
    let mut out = String::from(
        "| date | machine | figure | Parlor | Node ws | ratio (Parlor ÷ Node) |\n\
         |---|---|---|---:|---:|---:|\n",
    );
    for name in order {
        let (p, b) = values.get(&name).copied().unwrap_or((None, None));
        let ratio = match (p, b) {
            (Some(p), Some(b)) if b != 0.0 => format!("{:.2}", p / b),
            _ => "–".to_owned(),
        };
        out += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            args.date,
            args.machine,
            name,
            fmt(p),
            fmt(b),
            ratio
        );
    }
    if !notes.is_empty() {
        out += "\n";
        for note in notes {
            out += &note;
            out.push('\n');
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

    #[test]
    fn pairs_labels_and_computes_ratios() {
        let args = SummarizeArgs {
            files: Vec::new(),
            primary: "parlor".into(),
            baseline: "node".into(),
            date: "d".into(),
            machine: "m".into(),
        };
        let text = r#"
progress noise
{"scenario":"fanout","label":"parlor","figures":{"a: deliveries/s":200000.0,"only parlor":1.5}}
{"scenario":"fanout","label":"node","mode":"burst","figures":{"a: deliveries/s":100000.0},"machine_quiet":false,"other_cpu_seconds":1.5}
{"scenario":"fanout","label":"other","figures":{"a: deliveries/s":1.0}}
"#;
        let t = table(text, &args);
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
}
