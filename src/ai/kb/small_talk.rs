//! Small talk: greetings, thanks, acknowledgements and goodbyes get a short polite line
//! instead of a search of the documents, which would otherwise answer "hello" with
//! whatever passage says hello, or offer a person to someone who only said thanks.
//!
//! A message is small talk when every word of it belongs to [`PHRASES`] or [`FILLER`]
//! and it is short: "Hi there!", "thank you so much", "ok, bye". "Hi, how much does it
//! cost?" is a question and is searched as one.
//!
//! Depends on nothing else in Parlor.

/// What a small-talk message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Greeting,
    Thanks,
    Acknowledgement,
    Goodbye,
}

/// Words and word sequences of small talk, longest first within each kind so that "good
/// morning" is a greeting before "good" is an acknowledgement.
const PHRASES: &[(&[&str], Kind)] = &[
    (&["good", "morning"], Kind::Greeting),
    (&["good", "afternoon"], Kind::Greeting),
    (&["good", "evening"], Kind::Greeting),
    (&["how", "are", "you"], Kind::Greeting),
    (&["hi"], Kind::Greeting),
    (&["hello"], Kind::Greeting),
    (&["hey"], Kind::Greeting),
    (&["hiya"], Kind::Greeting),
    (&["howdy"], Kind::Greeting),
    (&["greetings"], Kind::Greeting),
    (&["hallo"], Kind::Greeting),
    (&["hola"], Kind::Greeting),
    (&["bonjour"], Kind::Greeting),
    (&["yo"], Kind::Greeting),
    (&["thank", "you"], Kind::Thanks),
    (&["thank", "u"], Kind::Thanks),
    (&["much", "appreciated"], Kind::Thanks),
    (&["thanks"], Kind::Thanks),
    (&["thx"], Kind::Thanks),
    (&["thanx"], Kind::Thanks),
    (&["ty"], Kind::Thanks),
    (&["cheers"], Kind::Thanks),
    (&["appreciated"], Kind::Thanks),
    (&["have", "a", "nice", "day"], Kind::Goodbye),
    (&["have", "a", "good", "day"], Kind::Goodbye),
    (&["see", "you"], Kind::Goodbye),
    (&["see", "ya"], Kind::Goodbye),
    (&["take", "care"], Kind::Goodbye),
    (&["bye"], Kind::Goodbye),
    (&["goodbye"], Kind::Goodbye),
    (&["cya"], Kind::Goodbye),
    (&["farewell"], Kind::Goodbye),
    (&["got", "it"], Kind::Acknowledgement),
    (&["all", "right"], Kind::Acknowledgement),
    (&["sounds", "good"], Kind::Acknowledgement),
    (&["ok"], Kind::Acknowledgement),
    (&["okay"], Kind::Acknowledgement),
    (&["okey"], Kind::Acknowledgement),
    (&["k"], Kind::Acknowledgement),
    (&["kk"], Kind::Acknowledgement),
    (&["alright"], Kind::Acknowledgement),
    (&["cool"], Kind::Acknowledgement),
    (&["great"], Kind::Acknowledgement),
    (&["nice"], Kind::Acknowledgement),
    (&["good"], Kind::Acknowledgement),
    (&["perfect"], Kind::Acknowledgement),
    (&["awesome"], Kind::Acknowledgement),
    (&["excellent"], Kind::Acknowledgement),
    (&["understood"], Kind::Acknowledgement),
    (&["fine"], Kind::Acknowledgement),
];

/// Words that may come with small talk without making it a question.
const FILLER: &[&str] = &[
    "a",
    "again",
    "all",
    "and",
    "so",
    "very",
    "much",
    "lot",
    "for",
    "the",
    "your",
    "help",
    "there",
    "then",
    "oh",
    "ah",
    "well",
    "everyone",
    "folks",
    "guys",
    "you",
    "that",
    "it",
    "that's",
    "it's",
    "assistant",
    "bot",
    "now",
    "this",
    "was",
    "is",
    "really",
    "super",
    "helped",
    "helpful",
    "useful",
    "later",
    "mate",
    "man",
    "dear",
];

/// Longest small-talk message, in words.
const MAX_WORDS: usize = 8;

/// The reply to `message` if it is small talk.
pub(super) fn reply(message: &str) -> Option<&'static str> {
    let lower = message.to_lowercase().replace('’', "'");
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() || words.len() > MAX_WORDS {
        return None;
    }
    let mut kinds = Vec::new();
    let mut i = 0;
    'words: while i < words.len() {
        for (phrase, kind) in PHRASES {
            if words[i..].starts_with(phrase) {
                kinds.push(*kind);
                i += phrase.len();
                continue 'words;
            }
        }
        if !FILLER.contains(&words[i]) {
            return None;
        }
        i += 1;
    }
    let has = |k| kinds.contains(&k);
    Some(match () {
        () if has(Kind::Thanks) && has(Kind::Goodbye) => {
            "You're welcome! Goodbye, and have a nice day."
        }
        () if has(Kind::Thanks) => "You're welcome! Is there anything else I can help you with?",
        () if has(Kind::Goodbye) => "Goodbye, and have a nice day!",
        () if has(Kind::Greeting) => "Hello! How can I help you today?",
        () if has(Kind::Acknowledgement) => {
            "All right. Is there anything else I can help you with?"
        }
        () => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::reply;

    #[test]
    fn small_talk_is_told_from_questions() {
        for (message, starts) in [
            ("hi", "Hello"),
            ("Hello there!", "Hello"),
            ("Good morning", "Hello"),
            ("thanks!", "You're welcome!"),
            ("Thank you so much", "You're welcome!"),
            ("ok thanks, bye", "You're welcome! Goodbye"),
            ("OK", "All right"),
            ("bye 👋", "Goodbye"),
            ("have a nice day", "Goodbye"),
            ("Thanks, that helped!", "You're welcome!"),
        ] {
            let got = reply(message);
            assert!(
                got.is_some_and(|r| r.starts_with(starts)),
                "{message:?}: {got:?}"
            );
        }
        for question in [
            "Hi, how much does it cost?",
            "thanks, but how do I reconnect?",
            "so",
            "",
            "👍",
        ] {
            assert_eq!(reply(question), None, "{question:?}");
        }
    }
}
