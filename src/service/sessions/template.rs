//! A guided session's template: its questions, how each answer is checked, and the
//! document the answers fill in.
//!
//! The JSON shape (files and the admin API alike):
//!
//! ```json
//! { "id": "nda", "name": "NDA", "description": "A mutual non-disclosure agreement",
//!   "questions": [
//!     { "id": "party_a", "text": "Who is the first party?", "help": "A company or a person" },
//!     { "id": "start", "text": "From when?", "kind": "date" },
//!     { "id": "years", "text": "For how many years?", "kind": "number", "required": true },
//!     { "id": "law", "text": "Which law applies?", "choices": ["English", "French"] },
//!     { "id": "ref", "text": "Your reference?", "required": false, "pattern": "^[A-Z]{3}-[0-9]+$" }
//!   ],
//!   "document": "# NDA\n\nBetween {{party_a}}, from {{start}}, for {{years}} years…" }
//! ```
//!
//! [`Template::parse`] checks everything a session would otherwise trip over later, so a
//! template that loads can be walked to the end.

use std::collections::{BTreeMap, HashSet};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::valid_id;

/// Most questions one template may have.
pub const MAX_QUESTIONS: usize = 200;
/// Longest answer kept, in characters.
pub const MAX_ANSWER_CHARS: usize = 4000;
/// Longest document a template may hold, in bytes.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Most placeholders a document holds, which bounds what it renders to (each answer is at
/// most [`MAX_ANSWER_CHARS`]).
pub const MAX_PLACEHOLDERS: usize = 1000;

/// What kind of value a question takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Any text.
    #[default]
    Text,
    /// A calendar date, written `YYYY-MM-DD`.
    Date,
    /// A number (an integer or a decimal with a point).
    Number,
    /// An e-mail address.
    Email,
}

/// One question, as written in the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionSpec {
    /// Its id: what the document's `{{id}}` placeholders name.
    pub id: String,
    /// What is asked.
    pub text: String,
    /// A hint shown with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
    /// Whether an empty answer is refused (default: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required: Option<bool>,
    /// The only answers taken, compared without regard to case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
    /// A regular expression a (non-empty) answer must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// What kind of value it takes.
    #[serde(default)]
    pub kind: Kind,
}

/// A template as written (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Its id: a UUID or a slug.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What it makes.
    #[serde(default)]
    pub description: String,
    /// The questions, in the order the built-in guide asks them.
    pub questions: Vec<QuestionSpec>,
    /// The document: Markdown with `{{question_id}}` placeholders.
    pub document: String,
    /// This template's own AI service, instead of its domain's; `""` means Parlor's
    /// built-in guide even where the domain has a service.
    #[serde(
        default,
        rename = "aiServiceUrl",
        skip_serializing_if = "Option::is_none"
    )]
    pub ai_service_url: Option<String>,
    /// The key sent to that service.
    #[serde(
        default,
        rename = "aiServiceApiKey",
        skip_serializing_if = "Option::is_none"
    )]
    pub ai_service_api_key: Option<String>,
}

/// A question ready to check answers.
#[derive(Debug, Clone)]
pub struct Question {
    /// As written.
    pub spec: QuestionSpec,
    pattern: Option<Regex>,
}

/// A checked template.
#[derive(Debug, Clone)]
pub struct Template {
    /// As written.
    pub spec: TemplateSpec,
    questions: Vec<Question>,
}

/// Why a template cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("template {id:?}: {message}")]
pub struct TemplateError {
    /// The template's id, as far as it is known.
    pub id: String,
    /// What is wrong.
    pub message: String,
}

impl Template {
    /// Reads and checks a template from its JSON.
    pub fn parse(json: &str) -> Result<Self, TemplateError> {
        let spec: TemplateSpec = serde_json::from_str(json).map_err(|e| TemplateError {
            id: String::new(),
            message: format!("not a template: {e}"),
        })?;
        Self::new(spec)
    }

    /// Checks a template: ids, questions, checks and placeholders.
    pub fn new(spec: TemplateSpec) -> Result<Self, TemplateError> {
        let fail = |message: String| TemplateError {
            id: spec.id.clone(),
            message,
        };
        if !valid_id(&spec.id) {
            return Err(fail(
                "`id` must be 1-128 characters of letters, digits and -_.:@".into(),
            ));
        }
        if spec.name.trim().is_empty() {
            return Err(fail("`name` must not be empty".into()));
        }
        if spec.questions.is_empty() || spec.questions.len() > MAX_QUESTIONS {
            return Err(fail(format!(
                "a template has 1 to {MAX_QUESTIONS} questions"
            )));
        }
        if spec.document.len() > MAX_DOCUMENT_BYTES {
            return Err(fail(format!(
                "`document` is larger than {MAX_DOCUMENT_BYTES} bytes"
            )));
        }
        if let Some(url) = spec.ai_service_url.as_deref().filter(|u| !u.is_empty())
            && (!(url.starts_with("https://") || url.starts_with("http://"))
                || reqwest::Url::parse(url).is_err())
        {
            return Err(fail(
                "`aiServiceUrl` must be an http:// or https:// URL, or \"\"".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut questions = Vec::with_capacity(spec.questions.len());
        for q in &spec.questions {
            if !valid_id(&q.id) {
                return Err(fail(format!("question id {:?} is not a valid id", q.id)));
            }
            if !seen.insert(q.id.as_str()) {
                return Err(fail(format!("two questions have the id {:?}", q.id)));
            }
            if q.text.trim().is_empty() {
                return Err(fail(format!("question {:?} has no text", q.id)));
            }
            if q.choices.as_ref().is_some_and(Vec::is_empty) {
                return Err(fail(format!("question {:?} lists no choices", q.id)));
            }
            let pattern = match &q.pattern {
                None => None,
                Some(p) => Some(Regex::new(p).map_err(|e| {
                    fail(format!(
                        "question {:?}: pattern does not compile: {e}",
                        q.id
                    ))
                })?),
            };
            questions.push(Question {
                spec: q.clone(),
                pattern,
            });
        }
        if spec.document.trim().is_empty() {
            return Err(fail("`document` must not be empty".into()));
        }
        let named = placeholders(&spec.document);
        if named.len() > MAX_PLACEHOLDERS {
            return Err(fail(format!(
                "the document has more than {MAX_PLACEHOLDERS} placeholders"
            )));
        }
        for name in named {
            if !seen.contains(name) {
                return Err(fail(format!(
                    "the document's {{{{{name}}}}} names no question"
                )));
            }
        }
        Ok(Self { spec, questions })
    }

    /// The questions, in order.
    pub fn questions(&self) -> &[Question] {
        &self.questions
    }

    /// The question `id`.
    pub fn question(&self, id: &str) -> Option<&Question> {
        self.questions.iter().find(|q| q.spec.id == id)
    }

    /// The document with each `{{id}}` replaced by that question's answer (an unanswered
    /// optional question leaves an empty string). Answers are put in as text: Markdown
    /// they contain is escaped, so an answer cannot add a heading, a link or HTML.
    pub fn render(&self, answers: &BTreeMap<String, String>) -> String {
        let doc = &self.spec.document;
        let mut out = String::with_capacity(doc.len());
        let mut rest = doc.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            match after.find("}}") {
                Some(end) if self.question(after[..end].trim()).is_some() => {
                    let id = after[..end].trim();
                    out.push_str(&escape_markdown(answers.get(id).map_or("", String::as_str)));
                    rest = &after[end + 2..];
                }
                _ => {
                    out.push_str("{{");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

impl Question {
    /// The answer as it is kept (trimmed, at most [`MAX_ANSWER_CHARS`]; a choice as the
    /// template spells it), or why it is not taken, in words for the user.
    pub fn check(&self, answer: &str) -> Result<String, String> {
        let answer = answer.trim();
        if answer.is_empty() {
            return if self.spec.required.unwrap_or(true) {
                Err("An answer is needed here.".into())
            } else {
                Ok(String::new())
            };
        }
        if answer.chars().count() > MAX_ANSWER_CHARS {
            return Err(format!(
                "Please keep the answer under {MAX_ANSWER_CHARS} characters."
            ));
        }
        if let Some(choices) = &self.spec.choices {
            return choices
                .iter()
                .find(|c| c.eq_ignore_ascii_case(answer))
                .cloned()
                .ok_or_else(|| format!("Please answer one of: {}.", choices.join(", ")));
        }
        match self.spec.kind {
            Kind::Text => {}
            Kind::Date => {
                if chrono::NaiveDate::parse_from_str(answer, "%Y-%m-%d").is_err() {
                    return Err("Please give a date as YYYY-MM-DD, e.g. 2027-01-31.".into());
                }
            }
            Kind::Number => {
                if answer.parse::<f64>().map_or(true, |n| !n.is_finite()) {
                    return Err("Please give a number, e.g. 3 or 2.5.".into());
                }
            }
            Kind::Email => {
                let ok = answer.split_once('@').is_some_and(|(local, host)| {
                    !local.is_empty()
                        && host.contains('.')
                        && !host.starts_with('.')
                        && !host.ends_with('.')
                        && !answer.contains(char::is_whitespace)
                });
                if !ok {
                    return Err("Please give an e-mail address, e.g. ann@example.com.".into());
                }
            }
        }
        if let Some(pattern) = &self.pattern
            && !pattern.is_match(answer)
        {
            return Err(match &self.spec.help {
                Some(help) => format!("That does not look right: {help}"),
                None => "That does not look right; please check the format.".into(),
            });
        }
        Ok(answer.to_owned())
    }
}

/// The names of the `{{name}}` placeholders of `document`.
fn placeholders(document: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = document;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        names.push(after[..end].trim());
        rest = &after[end + 2..];
    }
    names
}

/// The Markdown a document is read as when it is shown as HTML: CommonMark with tables and
/// strike-through.
pub fn markdown_options() -> pulldown_cmark::Options {
    pulldown_cmark::Options::ENABLE_TABLES | pulldown_cmark::Options::ENABLE_STRIKETHROUGH
}

/// `text` with what Markdown and HTML would read as markup escaped, so that it renders as
/// the text it is wherever a placeholder puts it (also at the start of a line):
/// - anywhere: `\\`, `` ` ``, `*`, `_`, `[`, `]`, `|`, `~` (emphasis, code, links,
///   tables, strike-through) and `<`, `&` (HTML, entities);
/// - at the start of a line: `#`, `>`, `-`, `+`, `=` (headings, quotes, list items, rules)
///   and the `.` or `)` after a number (ordered lists); a line's indentation is dropped (it
///   would make a code block).
///
/// Dates, e-mail addresses and sentences read as written ("2027-01-31", not
/// "2027\\-01\\-31").
fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        // Indentation is dropped: four spaces would make a code block.
        let body = line.trim_start_matches([' ', '\t']);
        let digits = body.bytes().take_while(u8::is_ascii_digit).count();
        for (at, c) in body.char_indices() {
            let line_start = at == 0;
            let after_number = digits > 0 && at == digits;
            match c {
                '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '~' => {
                    out.push('\\');
                    out.push(c);
                }
                '#' | '>' | '-' | '+' | '=' if line_start => {
                    out.push('\\');
                    out.push(c);
                }
                '.' | ')' if after_number => {
                    out.push('\\');
                    out.push(c);
                }
                '<' => out.push_str("&lt;"),
                '&' => out.push_str("&amp;"),
                c => out.push(c),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NDA: &str = r##"{
        "id": "nda", "name": "NDA", "description": "A mutual NDA",
        "questions": [
            { "id": "party_a", "text": "Who is the first party?" },
            { "id": "start", "text": "From when?", "kind": "date" },
            { "id": "years", "text": "For how many years?", "kind": "number" },
            { "id": "law", "text": "Which law applies?", "choices": ["English", "French"] },
            { "id": "contact", "text": "Contact e-mail?", "kind": "email", "required": false },
            { "id": "ref", "text": "Reference?", "required": false,
              "pattern": "^[A-Z]{3}-[0-9]+$", "help": "three capitals, a dash and digits" }
        ],
        "document": "# NDA\n\n{{party_a}} from {{ start }} for {{years}} years ({{law}} law). Ref {{ref}}. {{not a placeholder"
    }"##;

    #[test]
    fn a_template_loads_and_renders_its_answers_as_text() {
        let t = Template::parse(NDA).unwrap();
        assert_eq!(t.questions().len(), 6);
        let mut answers = BTreeMap::new();
        answers.insert("party_a".to_owned(), "ACME <b>*Ltd*</b> [x](y)".to_owned());
        answers.insert("start".to_owned(), "2027-01-31".to_owned());
        answers.insert("years".to_owned(), "3".to_owned());
        answers.insert("law".to_owned(), "English".to_owned());
        let doc = t.render(&answers);
        assert_eq!(
            doc,
            "# NDA\n\nACME &lt;b>\\*Ltd\\*&lt;/b> \\[x\\](y) from 2027-01-31 for 3 years (English law). Ref . {{not a placeholder"
        );
    }

    /// Whatever an answer holds, a Markdown renderer shows it as text, wherever the
    /// placeholder is: mid-line, or alone at the start of a line.
    #[test]
    fn answers_render_as_the_text_they_are() {
        use pulldown_cmark::{Event, Parser, Tag, TagEnd};
        let hostile = [
            "# Heading",
            "- item",
            "+ item",
            "* item",
            "> quote",
            "1. first",
            "12) twelfth",
            "===",
            "---",
            "   - indented",
            "    four spaces, a code block",
            "\tand a tab",
            "a *b* _c_ `d` ~~e~~ [f](g) ![h](i) <b>j</b> &amp; | k | \\ l",
            "two\n# lines\n- and\n3. more",
            "<script>alert(1)</script>",
            "2027-01-31, ann@example.com, Acme Ltd. (Ireland) 3-4 {x} #5 !",
        ];
        for answer in hostile {
            for (document, line_start) in [("Before {{a}} after.", false), ("{{a}}", true)] {
                let spec = TemplateSpec {
                    id: "t".into(),
                    name: "T".into(),
                    description: String::new(),
                    questions: vec![QuestionSpec {
                        id: "a".into(),
                        text: "A?".into(),
                        help: None,
                        required: None,
                        choices: None,
                        pattern: None,
                        kind: Kind::Text,
                    }],
                    document: document.into(),
                    ai_service_url: None,
                    ai_service_api_key: None,
                };
                let t = Template::new(spec).unwrap();
                let rendered = t.render(&BTreeMap::from([("a".to_owned(), answer.to_owned())]));
                let mut text = String::new();
                for event in Parser::new_ext(&rendered, markdown_options()) {
                    match event {
                        Event::Text(t) => text.push_str(&t),
                        Event::SoftBreak | Event::HardBreak => text.push('\n'),
                        Event::Start(Tag::Paragraph) | Event::End(TagEnd::Paragraph) => {}
                        other => panic!("{answer:?} in {document:?} renders {other:?}: {rendered}"),
                    }
                }
                let shown = answer
                    .split('\n')
                    .map(str::trim_start)
                    .collect::<Vec<_>>()
                    .join("\n");
                let expected = if line_start {
                    shown
                } else {
                    format!("Before {shown} after.")
                };
                let normalise = |s: &str| s.lines().map(str::trim).collect::<Vec<_>>().join("\n");
                assert_eq!(normalise(&text), normalise(&expected), "{rendered}");
            }
        }
    }

    #[test]
    fn answers_are_checked_with_a_reason() {
        let t = Template::parse(NDA).unwrap();
        let q = |id: &str| t.question(id).unwrap();
        assert_eq!(q("party_a").check("  Ann  "), Ok("Ann".to_owned()));
        assert!(q("party_a").check("   ").unwrap_err().contains("needed"));
        assert!(
            q("start")
                .check("31/01/2027")
                .unwrap_err()
                .contains("YYYY-MM-DD")
        );
        assert!(q("start").check("2027-02-30").is_err());
        assert_eq!(q("start").check("2027-02-28"), Ok("2027-02-28".to_owned()));
        assert!(q("years").check("three").is_err());
        assert!(q("years").check("inf").is_err());
        assert_eq!(q("years").check("2.5"), Ok("2.5".to_owned()));
        assert_eq!(q("law").check("french"), Ok("French".to_owned()));
        assert!(
            q("law")
                .check("German")
                .unwrap_err()
                .contains("English, French")
        );
        assert_eq!(q("contact").check(""), Ok(String::new()));
        assert!(q("contact").check("ann@example").is_err());
        assert!(q("contact").check("ann @example.com").is_err());
        assert!(q("contact").check("ann@example.com").is_ok());
        assert!(
            q("ref")
                .check("abc-1")
                .unwrap_err()
                .contains("three capitals")
        );
        assert!(q("ref").check("ABC-12").is_ok());
        assert!(
            q("party_a")
                .check(&"x".repeat(MAX_ANSWER_CHARS + 1))
                .is_err()
        );
    }

    #[test]
    fn unusable_templates_are_refused_with_the_reason() {
        let with = |change: serde_json::Value| {
            let mut v: serde_json::Value = serde_json::from_str(NDA).unwrap();
            for (k, val) in change.as_object().unwrap() {
                v[k] = val.clone();
            }
            Template::parse(&v.to_string()).unwrap_err().message
        };
        let cases = [
            (serde_json::json!({ "id": "bad id" }), "`id`"),
            (serde_json::json!({ "name": " " }), "`name`"),
            (serde_json::json!({ "questions": [] }), "1 to"),
            (
                serde_json::json!({ "document": " \n" }),
                "`document` must not be empty",
            ),
            (
                serde_json::json!({ "document": "{{party_a}}".repeat(MAX_PLACEHOLDERS + 1) }),
                "placeholders",
            ),
            (
                serde_json::json!({ "aiServiceUrl": "ftp://ai.example" }),
                "`aiServiceUrl`",
            ),
            (
                serde_json::json!({ "document": "{{nobody}}" }),
                "names no question",
            ),
            (
                serde_json::json!({ "questions": [{ "id": "a", "text": "A" }, { "id": "a", "text": "B" }], "document": "" }),
                "two questions",
            ),
            (
                serde_json::json!({ "questions": [{ "id": "a", "text": "A", "pattern": "(" }], "document": "" }),
                "does not compile",
            ),
            (
                serde_json::json!({ "questions": [{ "id": "a", "text": "A", "choices": [] }], "document": "" }),
                "no choices",
            ),
            (
                serde_json::json!({ "questions": [{ "id": "a", "text": "" }], "document": "" }),
                "no text",
            ),
        ];
        for (change, why) in cases {
            let message = with(change.clone());
            assert!(message.contains(why), "{change}: {message}");
        }
        assert!(
            Template::parse("{")
                .unwrap_err()
                .message
                .contains("not a template")
        );
        assert!(
            Template::parse(r#"{"id":"x","name":"X","questions":[],"document":"","extra":1}"#)
                .unwrap_err()
                .message
                .contains("unknown field")
        );
    }
}
