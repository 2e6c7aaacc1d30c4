//! Turns figment's errors into [`ConfigError`] sentences.
//!
//! Figment knows the path of a bad key and which provider gave it, but prints the profile
//! (`default.limits.x`), every allowed key and no line. This finds the key where the user
//! wrote it: the environment variable (matched case-insensitively, as figment reads them)
//! or the file, whose line it reads from the TOML with positions.

use std::path::Path;

use figment::error::{Actual, Kind};
use figment::{Error, Source};

use super::ConfigError;

/// The prefix of the configuration's environment variables.
const PREFIX: &str = "PARLOR_";

/// Where a bad key was written.
enum Origin {
    /// A file, with the line of the key when it could be found.
    File { key: String, line: Option<usize> },
    /// An environment variable.
    Env { var: String },
    /// Neither could be told (a built-in value): only the key.
    Key(String),
}

/// The sentence for the first of figment's errors. `file` is the configuration file
/// that was read, if any.
pub(super) fn figment_error(error: Error, file: Option<&Path>) -> ConfigError {
    let Some(error) = error.into_iter().next() else {
        return ConfigError::Invalid("the configuration cannot be read".to_owned());
    };
    let from_file = matches!(
        error.metadata.as_ref().and_then(|m| m.source.as_ref()),
        Some(Source::File(_))
    );
    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    // A file that is not TOML fails before any key is read.
    if from_file
        && error.path.is_empty()
        && let (Kind::Message(reason), Some(path)) = (&error.kind, file)
    {
        return ConfigError::File {
            path: path.to_owned(),
            reason: toml_reason(reason),
        };
    }
    let path = &error.path;
    let env_var = env_var_for(path);
    let origin = match (from_env, from_file, env_var, file) {
        (true, _, Some(var), _) => Origin::Env { var },
        (true, _, None, _) => Origin::Env {
            var: format!("{PREFIX}{}", path.join("__").to_ascii_uppercase()),
        },
        (false, true, _, Some(file)) => Origin::File {
            key: display_key(path),
            line: line_of(file, path),
        },
        (false, false, Some(var), _) => Origin::Env { var },
        (false, false, None, Some(file)) if line_of(file, path).is_some() => Origin::File {
            key: display_key(path),
            line: line_of(file, path),
        },
        _ => Origin::Key(display_key(path)),
    };
    let place = match &origin {
        Origin::File { key, line } => {
            let line = line.map(|l| format!(", line {l}")).unwrap_or_default();
            let file = file.map(|f| f.display().to_string()).unwrap_or_default();
            format!("`{key}` in {file}{line}")
        }
        Origin::Env { var } => format!("the environment variable {var}"),
        Origin::Key(key) if key.is_empty() => "the configuration".to_owned(),
        Origin::Key(key) => format!("`{key}`"),
    };
    let problem = match &error.kind {
        Kind::UnknownField(found, expected) => {
            let parent = &path[..path.len().saturating_sub(1)];
            let suggestion = closest(found, expected).map(|close| match &origin {
                Origin::Env { .. } => {
                    let mut key = parent.to_vec();
                    key.push(close.to_owned());
                    format!("{PREFIX}{}", key.join("__").to_ascii_uppercase())
                }
                _ => {
                    let mut key = parent.to_vec();
                    key.push(close.to_owned());
                    format!("`{}`", display_key(&key))
                }
            });
            let section = if parent.is_empty() {
                "the top level".to_owned()
            } else {
                format!("`{}`", display_key(parent))
            };
            match suggestion {
                Some(s) => format!("is not a configuration key; did you mean {s}?"),
                None if expected.len() <= FEW_KEYS => format!(
                    "is not a configuration key (the keys of {section} are {})",
                    expected.join(", ")
                ),
                None => format!(
                    "is not a configuration key (parlor.example.toml shows every key of \
                     {section})"
                ),
            }
        }
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "must be {}, not {}",
                expected_text(expected),
                actual_text(actual)
            )
        }
        Kind::UnknownVariant(found, expected) => {
            let choices: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
            let choices = match choices.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => "nothing".to_owned(),
            };
            format!("must be {choices}, not {found:?}")
        }
        Kind::MissingField(name) => format!("needs the key `{name}`"),
        Kind::Message(message) => format!("is invalid: {message}"),
        other => format!("is invalid: {other}"),
    };
    ConfigError::Key { place, problem }
}

/// Sections with at most this many keys list them after an unknown key; larger ones
/// point to the example file instead of a paragraph of names.
const FEW_KEYS: usize = 8;

/// toml's error ("TOML parse error at line 1, column 12", a snippet of the file with a
/// caret, then what was expected) as one line: "line 1, column 12: invalid array,
/// expected `]`".
fn toml_reason(text: &str) -> String {
    let mut lines = text.lines();
    let head = lines.next().unwrap_or_default();
    let at = head.strip_prefix("TOML parse error at ").unwrap_or(head);
    let snippet = |line: &str| {
        let line = line.trim_start();
        line.starts_with('|')
            || line
                .split_once(" |")
                .is_some_and(|(n, _)| n.bytes().all(|b| b.is_ascii_digit()))
    };
    let what: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| !l.is_empty() && !snippet(l))
        .collect();
    if what.is_empty() {
        at.to_owned()
    } else {
        format!("{at}: {}", what.join(", "))
    }
}

/// `domains[0].bot.enabled` for the path `domains`, `0`, `bot`, `enabled`.
fn display_key(path: &[String]) -> String {
    let mut key = String::new();
    for part in path {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            key.push_str(&format!("[{part}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(part);
        }
    }
    key
}

/// The environment variable that sets `path`, spelled as it is set.
fn env_var_for(path: &[String]) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let wanted = path.join("__");
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .find(|name| {
            name.get(..PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
                && name
                    .get(PREFIX.len()..)
                    .is_some_and(|rest| rest.eq_ignore_ascii_case(&wanted))
        })
}

/// The line of `path` in the TOML file: of the key itself, or of the deepest table on
/// its way that exists (a missing key is reported on its table's line).
fn line_of(file: &Path, path: &[String]) -> Option<usize> {
    let text = std::fs::read_to_string(file).ok()?;
    let doc = toml_edit::ImDocument::parse(text.as_str()).ok()?;
    let span = span_in_table(doc.as_table(), path)?;
    Some(text.get(..span.start)?.matches('\n').count() + 1)
}

type Span = std::ops::Range<usize>;

fn span_in_table(table: &dyn toml_edit::TableLike, path: &[String]) -> Option<Span> {
    let (first, rest) = path.split_first()?;
    let (key, item) = table.get_key_value(first)?;
    span_in_item(item, rest).or_else(|| key.span())
}

fn span_in_item(item: &toml_edit::Item, path: &[String]) -> Option<Span> {
    let (first, rest) = path.split_first()?;
    if let Some(table) = item.as_table_like() {
        return span_in_table(table, path);
    }
    let index: usize = first.parse().ok()?;
    if let Some(tables) = item.as_array_of_tables() {
        let table = tables.get(index)?;
        return span_in_table(table, rest).or_else(|| table.span());
    }
    let value = item.as_array()?.get(index)?;
    value
        .as_inline_table()
        .and_then(|t| span_in_table(t, rest))
        .or_else(|| value.span())
}

/// serde's name of an expected type, for people.
fn expected_text(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a sequence" => "a list".to_owned(),
        "a map" => "a table".to_owned(),
        e if e.starts_with("struct ") => "a table".to_owned(),
        e => e.to_owned(),
    }
}

/// A value that was found, for people.
fn actual_text(actual: &Actual) -> String {
    match actual {
        Actual::Str(s) => format!("the string {s:?}"),
        Actual::Unsigned(n) => format!("the number {n}"),
        Actual::Signed(n) => format!("the number {n}"),
        Actual::Float(n) => format!("the number {n}"),
        Actual::Bool(b) => format!("{b}"),
        Actual::Seq => "a list".to_owned(),
        Actual::Map => "a table".to_owned(),
        other => other.to_string(),
    }
}

/// The candidate closest to `found`, if it is close enough to be a typo of it: at most
/// a third of its letters differ (at least one may).
pub(super) fn closest<'a>(found: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let found = found.to_ascii_lowercase();
    let limit = (found.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&found, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance: insertions, deletions and substitutions of one character.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key() {
        let keys = ["max_frame_bytes", "max_message_bytes", "max_page"];
        assert_eq!(closest("max_frame_bytez", &keys), Some("max_frame_bytes"));
        assert_eq!(closest("MAX_PAGES", &keys), Some("max_page"));
        assert_eq!(closest("colour", &keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn toml_errors_fit_on_one_line() {
        let text = "TOML parse error at line 1, column 12\n  |\n1 | listen = [\n  |            ^\ninvalid array\nexpected `]`\n";
        assert_eq!(
            toml_reason(text),
            "line 1, column 12: invalid array, expected `]`"
        );
    }

    #[test]
    fn keys_are_shown_as_written() {
        let path = ["domains", "1", "bot", "enabled"].map(String::from);
        assert_eq!(display_key(&path), "domains[1].bot.enabled");
    }

    #[test]
    fn lines_are_found_in_tables_arrays_and_dotted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("parlor.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\nlimits.max_page = 5\n\n[[domains]]\nid = \"a\"\n\n\
             [[domains]]\nid = \"b\"\nbot = { enabled = true }\n",
        )
        .unwrap();
        let line = |p: &[&str]| {
            line_of(
                &file,
                &p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(line(&["listen"]), Some(1));
        assert_eq!(line(&["limits", "max_page"]), Some(2));
        assert_eq!(line(&["domains", "1", "id"]), Some(8));
        assert_eq!(line(&["domains", "1", "bot", "enabled"]), Some(9));
        assert_eq!(
            line(&["domains", "0", "name"]),
            Some(4),
            "a missing key: its table"
        );
        assert_eq!(line(&["store"]), None);
    }
}
