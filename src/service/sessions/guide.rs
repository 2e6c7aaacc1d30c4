//! The built-in guide: the template's questions in order, each answer checked, and, when the
//! domain has an AI vendor, one short call per answer that either asks a clarifying
//! follow-up (the answer is too vague to write into the document) or words the next
//! question to follow the answer. Offline, or when the vendor fails or says something
//! else, the template's own words are used: the vendor can make the session nicer, never
//! stop it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::template::{Question, Template};
use crate::ai::{Speaker, Turn};

/// Longest the guide waits for the vendor before asking in the template's words.
pub const PHRASE_DEADLINE: Duration = Duration::from_secs(10);

/// Longest follow-up or reworded question taken from the vendor.
const MAX_PHRASE_CHARS: usize = 500;

/// Where the guide is in a session (stored as the session's state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The question being answered (an index into the template's questions).
    pub index: usize,
    /// Follow-ups asked about it so far.
    #[serde(rename = "followUps")]
    pub follow_ups: u32,
    /// The answers taken, by question id.
    pub answers: BTreeMap<String, String>,
}

impl State {
    /// Reads a stored state (a session of an AI service stores `{}`, read as the start).
    pub fn parse(json: &str) -> Self {
        serde_json::from_str(json).unwrap_or_default()
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// What the vendor advised after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advice {
    /// Ask this before moving on.
    FollowUp(String),
    /// Ask the next question in these words.
    Next(String),
    /// Use the template's words.
    Verbatim,
}

impl Advice {
    /// Reads the vendor's one-line reply (`None`: no vendor, or it failed).
    pub fn read(reply: Option<&str>, has_next: bool) -> Self {
        let Some(line) = reply.map(str::trim) else {
            return Advice::Verbatim;
        };
        let take = |rest: &str| {
            let rest = rest.trim().trim_matches('"').trim();
            (!rest.is_empty() && rest.chars().count() <= MAX_PHRASE_CHARS).then(|| rest.to_owned())
        };
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("FOLLOW-UP:") {
            return take(&line["FOLLOW-UP:".len()..]).map_or(Advice::Verbatim, Advice::FollowUp);
        }
        if has_next && upper.starts_with("NEXT:") {
            return take(&line["NEXT:".len()..]).map_or(Advice::Verbatim, Advice::Next);
        }
        Advice::Verbatim
    }
}

/// The instructions and the turn for the vendor after `answer` to `question`.
pub fn prompt(
    template: &Template,
    question: &Question,
    answer: &str,
    next: Option<&Question>,
) -> (String, Vec<Turn>) {
    let mut instructions = format!(
        "You help a person fill in \"{}\" by asking one question at a time.\n\
         The question asked: {}\n",
        template.spec.name, question.spec.text
    );
    let last = match next {
        Some(next) => {
            instructions.push_str(&format!("The next question: {}\n", next.spec.text));
            "Otherwise reply with one line: NEXT: followed by the next question, reworded \
             in one sentence to follow naturally from their answer, with the same meaning."
        }
        None => "Otherwise reply with one line: NEXT:",
    };
    instructions.push_str(
        "If their answer is too vague or incomplete to be written into the document, reply \
         with one line: FOLLOW-UP: followed by one short question asking for what is missing. ",
    );
    instructions.push_str(last);
    instructions.push_str(" Reply with that one line only.");
    let turns = vec![Turn {
        speaker: Speaker::User,
        text: answer.to_owned(),
    }];
    (instructions, turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_is_read_from_one_line_and_anything_else_is_verbatim() {
        assert_eq!(
            Advice::read(Some("FOLLOW-UP: Which company?"), true),
            Advice::FollowUp("Which company?".into())
        );
        assert_eq!(
            Advice::read(Some("next: \"And when does it start?\""), true),
            Advice::Next("And when does it start?".into())
        );
        assert_eq!(Advice::read(Some("NEXT: x"), false), Advice::Verbatim);
        assert_eq!(Advice::read(Some("Sure! Here is"), true), Advice::Verbatim);
        assert_eq!(Advice::read(Some("FOLLOW-UP:   "), true), Advice::Verbatim);
        assert_eq!(Advice::read(None, true), Advice::Verbatim);
        let long = format!("NEXT: {}", "a".repeat(MAX_PHRASE_CHARS + 1));
        assert_eq!(Advice::read(Some(&long), true), Advice::Verbatim);
    }

    #[test]
    fn state_round_trips_and_unreadable_state_starts_over() {
        let s = State {
            index: 2,
            answers: BTreeMap::from([("a".into(), "b".into())]),
            ..State::default()
        };
        assert_eq!(State::parse(&s.to_json()), s);
        assert_eq!(State::parse("{}"), State::default());
        assert_eq!(State::parse("garbage"), State::default());
    }
}
