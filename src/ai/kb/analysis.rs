//! How text becomes search terms, the same way for documents and questions, so that a
//! question finds a passage written in other words:
//!
//! - the `bm25` crate's English tokenizer: Unicode normalisation, lower case, stop words
//!   and Snowball stemming (`reconnecting` and `reconnects` are one term);
//! - [`ALIASES`]: words of one meaning in a support conversation become one term
//!   (`cost`, `price`, `pricing`, `fee`…), on both sides, so the index needs no expansion;
//! - [`PHRASES`]: two terms near each other that together mean a third add it (`lose` near
//!   `connection` adds `disconnect`);
//! - for questions only, [`Analyzer::correct`]: a misspelt word the documents do not hold
//!   is replaced by the nearest word they do (`conection` → `connection`).
//!
//! Depends on the `bm25` crate's tokenizer only.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use bm25::{DefaultTokenizer, Language, Tokenizer};

/// Groups of words with one meaning in a support conversation; every word of a group is
/// indexed and searched as the group's first word. Kept to meanings that hold in any
/// domain's help pages, since every knowledge base uses this table. The stemmer already
/// joins regular forms (`cost`, `costs`, `costing`); a group lists them only where a
/// misspelling of them should be corrected.
#[rustfmt::skip]
const ALIASES: &[&[&str]] = &[
    &["price", "pricing", "cost", "fee", "charge", "pay", "paying", "expensive", "cheap"],
    &["licence", "license", "licensing"],
    &["human", "person", "people", "agent", "operator", "representative", "staff", "someone",
      "escalate", "escalation", "handoff"],
    &["talk", "speak", "talking", "speaking"],
    &["disconnect", "reconnect", "reconnecting", "offline"],
    // "loose" is the usual misspelling of "lose".
    &["lose", "losing", "loose"],
    &["store", "keep", "save"],
    &["assistant", "bot", "chatbot", "ai"],
    &["answer", "reply", "respond", "response"],
    &["widget", "bubble", "snippet"],
    &["add", "embed", "insert", "install", "installing", "installation"],
    &["website", "site", "webpage", "homepage"],
    &["privacy", "private", "gdpr", "confidential"],
    &["delete", "remove", "erase"],
    &["limit", "maximum", "max", "quota"],
    &["size", "length", "big", "large"],
    &["setup", "deploy", "deployment"],
    &["provider", "vendor", "company"],
    &["colour", "color"],
    &["phone", "mobile", "smartphone", "iphone", "android", "tablet"],
    &["setting", "configure", "configuration", "config"],
    &["change", "modify", "edit", "alter", "customise", "customize"],
    &["model", "llm"],
    &["error", "mistake", "wrong"],
];

/// Forms the stemmer leaves apart from their word: irregular verbs and a few nouns,
/// (form, word).
#[rustfmt::skip]
const IRREGULAR: &[(&str, &str)] = &[
    ("sent", "send"), ("kept", "keep"), ("lost", "lose"), ("paid", "pay"), ("made", "make"),
    ("gone", "go"), ("went", "go"), ("told", "tell"), ("knew", "know"), ("known", "know"),
    ("bought", "buy"), ("built", "build"), ("chose", "choose"), ("chosen", "choose"),
    ("found", "find"), ("gave", "give"), ("given", "give"), ("took", "take"),
    ("taken", "take"), ("saw", "see"), ("seen", "see"), ("wrote", "write"),
    ("written", "write"), ("spoke", "speak"), ("spoken", "speak"), ("broke", "break"),
    ("broken", "break"), ("ran", "run"), ("came", "come"), ("thought", "think"),
    ("brought", "bring"), ("held", "hold"), ("meant", "mean"), ("shown", "show"),
    ("hidden", "hide"), ("forgot", "forget"), ("forgotten", "forget"),
    ("understood", "understand"), ("spent", "spend"), ("sold", "sell"), ("lent", "lend"),
    ("felt", "feel"), ("left", "leave"), ("dealt", "deal"), ("stuck", "stick"),
    ("tracker", "track"), ("trackers", "track"),
];

/// Words that carry no topic in a support question, left out on both sides beside the
/// tokenizer's stop words: quantity and politeness words ("how much", "please", "hi,
/// I'd like to know…") and the question's frame ("how does it work", "what exactly")
/// would otherwise count as words the documents fail to match.
#[rustfmt::skip]
const IGNORED: &[&str] = &[
    "much", "many", "would", "could", "please", "also", "may", "might", "must", "shall",
    "let", "really", "actually", "exactly", "basically", "ever", "hi", "hello", "hey",
    "thanks", "thank", "ok", "okay", "tell", "know", "want", "wonder", "wondering",
    "question", "anyone", "anybody", "get", "what", "how", "where", "who", "why", "when",
    "which", "there", "here", "work", "works",
];

/// Two kinds of term that, within [`PHRASE_WINDOW`] terms of each other, add a third:
/// "lose my connection", "the connection keeps dropping" and "internet cut" all mean a
/// disconnection, though neither word alone does.
#[rustfmt::skip]
const PHRASES: &[(&[&str], &[&str], &str)] = &[
    (
        &["connection", "internet", "network", "wifi", "signal"],
        &["lose", "drop", "dropped", "dropping", "cut", "interrupt", "unstable", "flaky", "fail"],
        "disconnect",
    ),
    (&["open"], &["source"], "licence"),
    // "live support", "live help": a person, not the software.
    (&["live"], &["support", "help"], "human"),
];

/// How far apart (in terms, stop words not counted) the two words of a phrase may be.
const PHRASE_WINDOW: usize = 2;

/// Turns documents and questions into terms.
pub(super) struct Analyzer {
    tokenizer: DefaultTokenizer,
    /// A word's stem → the term it is indexed as.
    aliases: HashMap<String, String>,
    /// [`PHRASES`] as terms.
    phrases: Vec<(Vec<String>, Vec<String>, String)>,
    /// [`IGNORED`] as stems.
    ignored: HashSet<String>,
    /// Every word of the tables (see [`Self::table_words`]).
    table: HashSet<&'static str>,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analyzer")
            .field("aliases", &self.aliases.len())
            .finish_non_exhaustive()
    }
}

impl Analyzer {
    /// The English analyzer with the alias and phrase tables.
    pub(super) fn new() -> Self {
        let tokenizer = DefaultTokenizer::new(Language::English);
        let stem = |word: &str| tokenizer.tokenize(word).into_iter().next();
        let mut aliases = HashMap::new();
        for group in ALIASES {
            let Some(canonical) = group.first().and_then(|w| stem(w)) else {
                continue;
            };
            for word in *group {
                if let Some(s) = stem(word) {
                    aliases.entry(s).or_insert_with(|| canonical.clone());
                }
            }
        }
        for (form, verb) in IRREGULAR {
            if let (Some(form), Some(verb)) = (stem(form), stem(verb)) {
                let meaning = aliases.get(&verb).cloned().unwrap_or(verb);
                aliases.entry(form).or_insert(meaning);
            }
        }
        let ignored = IGNORED.iter().filter_map(|w| stem(w)).collect();
        let mut analyzer = Self {
            tokenizer,
            aliases,
            phrases: Vec::new(),
            ignored,
            table: Self::table_words().collect(),
        };
        let terms = |words: &[&str], a: &Analyzer| -> Vec<String> {
            words.iter().flat_map(|w| a.plain_terms(w)).collect()
        };
        let phrases = PHRASES
            .iter()
            .map(|(a, b, adds)| {
                let added = terms(&[adds], &analyzer).into_iter().next();
                (
                    terms(a, &analyzer),
                    terms(b, &analyzer),
                    added.unwrap_or_else(|| (*adds).to_owned()),
                )
            })
            .collect();
        analyzer.phrases = phrases;
        analyzer
    }

    /// The terms of `text`: stems, aliased, then the terms its phrases add.
    pub(super) fn terms(&self, text: &str) -> Vec<String> {
        self.explained_terms(text).0
    }

    /// [`Self::terms`], and which of them a phrase explains: (word of the phrase, the term
    /// the phrase added). In "my wifi dropped", `wifi` and `drop` are explained by
    /// `disconnect`: a passage about disconnections answers them even if it never says
    /// "wifi".
    pub(super) fn explained_terms(&self, text: &str) -> (Vec<String>, Vec<(String, String)>) {
        let mut terms = self.plain_terms(text);
        let mut explained = Vec::new();
        let mut added: Vec<String> = Vec::new();
        for (a, b, adds) in &self.phrases {
            for (i, t) in terms.iter().enumerate() {
                if !a.contains(t) {
                    continue;
                }
                for (j, u) in terms.iter().enumerate() {
                    if i.abs_diff(j) <= PHRASE_WINDOW && b.contains(u) {
                        explained.push((t.clone(), adds.clone()));
                        explained.push((u.clone(), adds.clone()));
                        if !added.contains(adds) {
                            added.push(adds.clone());
                        }
                    }
                }
            }
        }
        terms.extend(added);
        (terms, explained)
    }

    /// Stems of `text`, aliased, without phrases. Contractions the stemmer left whole
    /// (`i'd`, `can't`) carry no topic and are left out like stop words.
    fn plain_terms(&self, text: &str) -> Vec<String> {
        // The tokenizer's transliteration (of text with any non-ASCII character) drops line
        // breaks, which would glue the words around them together; and Unicode word
        // breaking keeps an underscore inside a word, though `allowed_origins` is about
        // origins.
        let text = text.replace(['\n', '\r', '\t', '_'], " ");
        self.tokenizer
            .tokenize(&text)
            .into_iter()
            .filter(|stem| !stem.contains('\'') && !self.ignored.contains(stem))
            .map(|stem| self.aliases.get(&stem).cloned().unwrap_or(stem))
            .collect()
    }

    /// `question` with each word that is neither in `vocabulary`, nor a stop word, nor a
    /// term `known` to the index replaced by the nearest word of `vocabulary` (see
    /// [`nearest`]). Words shorter than four letters are left alone: too many real words
    /// lie one letter away from them.
    pub(super) fn correct<'q>(
        &self,
        question: &'q str,
        vocabulary: &HashMap<String, u32>,
        known: impl Fn(&str) -> bool,
    ) -> Cow<'q, str> {
        let mut out = String::new();
        let mut last = 0;
        for (start, word) in words(question) {
            let lower = word.to_lowercase();
            if lower.chars().count() < 4 || vocabulary.contains_key(&lower) {
                continue;
            }
            let terms = self.plain_terms(&lower);
            // A stop word, or a form of a word the documents hold (`reconnected`).
            if terms.is_empty() || terms.iter().all(|t| known(t)) {
                continue;
            }
            let is_stop = |w: &str| self.tokenizer.tokenize(w).is_empty();
            let fix = compound(&lower, vocabulary, is_stop).or_else(|| {
                nearest(&lower, vocabulary, is_stop, |w| self.table.contains(w)).map(str::to_owned)
            });
            if let Some(fix) = fix {
                out.push_str(&question[last..start]);
                out.push_str(&fix);
                last = start + word.len();
            }
        }
        if last == 0 {
            return Cow::Borrowed(question);
        }
        out.push_str(&question[last..]);
        Cow::Owned(out)
    }

    /// Every word of the alias and phrase tables, so a misspelling of one is corrected even
    /// when the documents use another word of its group.
    pub(super) fn table_words() -> impl Iterator<Item = &'static str> {
        ALIASES
            .iter()
            .flat_map(|g| g.iter().copied())
            .chain(IRREGULAR.iter().flat_map(|(form, verb)| [*form, *verb]))
            .chain(
                PHRASES
                    .iter()
                    .flat_map(|(a, b, adds)| a.iter().chain(b.iter()).copied().chain([*adds])),
            )
    }
}

/// The words of `text` (runs of letters) with their byte offsets.
pub(super) fn words(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut rest = text.char_indices().peekable();
    std::iter::from_fn(move || {
        let (start, _) = rest.find(|(_, c)| c.is_alphabetic())?;
        let mut end = text.len();
        while let Some(&(i, c)) = rest.peek() {
            if !c.is_alphabetic() {
                end = i;
                break;
            }
            rest.next();
        }
        Some((start, &text[start..end]))
    })
}

/// Two words of `vocabulary` written as one (`opensource` → "open source"), each of at
/// least three letters and neither a stop word; of several splits, the one whose rarer
/// part is the most frequent.
fn compound(
    word: &str,
    vocabulary: &HashMap<String, u32>,
    is_stop: impl Fn(&str) -> bool,
) -> Option<String> {
    let count = |w: &str| {
        vocabulary
            .get(w)
            .copied()
            .filter(|_| w.chars().count() >= 3 && !is_stop(w))
    };
    word.char_indices()
        .skip(1)
        .filter_map(|(i, _)| {
            let (a, b) = word.split_at(i);
            Some((count(a)?.min(count(b)?), i))
        })
        .max_by_key(|&(n, i)| (n, std::cmp::Reverse(i)))
        .map(|(_, i)| format!("{} {}", &word[..i], &word[i..]))
}

/// The word of `vocabulary` nearest to `word`, if near enough. A stop word with one
/// letter more or two swapped is always near enough (`wich` → `which`, `dose` → `does`):
/// it only drops out of the question. Other words must be nearer the shorter `word` is,
/// since a short word is one letter away from many real words (`shoes` and `shows`,
/// `reset` and `resent`): for four or five letters, only the same letters with two
/// neighbours swapped (`cots` → `cost`), and for five also one letter off a word of the
/// alias tables (`humen` → `human`), the words support questions are made of; for six or
/// seven, one letter added, removed, changed or swapped; from eight on, two. Apart from
/// stop words, the first letter must be the same (`iphone` is not `phone`). Of equally
/// near words the most frequent wins.
fn nearest<'v>(
    word: &str,
    vocabulary: &'v HashMap<String, u32>,
    is_stop: impl Fn(&str) -> bool,
    is_table_word: impl Fn(&str) -> bool,
) -> Option<&'v str> {
    let chars: Vec<char> = word.chars().collect();
    let max = match chars.len() {
        0..=3 => return None,
        4..=7 => 1,
        _ => 2,
    };
    let first = chars.first().copied();
    let mut best: Option<(usize, u32, &str)> = None;
    for (candidate, &count) in vocabulary {
        let other: Vec<char> = candidate.chars().collect();
        if other.len().abs_diff(chars.len()) > max || other.len() < 3 {
            continue;
        }
        let Some(d) = distance(&chars, &other, max) else {
            continue;
        };
        let near = match chars.len() {
            // A letter left out or swapped, not one changed or added: `sale` is not a
            // misspelt `same`, nor `fork` a misspelt `for`.
            _ if d == 1 && is_stop(candidate) => {
                other.len() > chars.len() || same_letters(&chars, &other)
            }
            _ if other.first().copied() != first => false,
            4 => other.len() == 4 && same_letters(&chars, &other),
            5 => (other.len() == 5 && same_letters(&chars, &other)) || is_table_word(candidate),
            _ => true,
        };
        if !near {
            continue;
        }
        let better = best.is_none_or(|(bd, bc, bw)| {
            (d, std::cmp::Reverse(count), candidate.as_str()) < (bd, std::cmp::Reverse(bc), bw)
        });
        if better {
            best = Some((d, count, candidate));
        }
    }
    best.map(|(_, _, w)| w)
}

fn same_letters(a: &[char], b: &[char]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The optimal string alignment distance between `a` and `b` (insertions, deletions,
/// substitutions and swaps of neighbours), or `None` when it is above `max`.
fn distance(a: &[char], b: &[char], max: usize) -> Option<usize> {
    let width = b.len() + 1;
    let mut rows = vec![vec![0usize; width]; a.len() + 1];
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        rows[i][0] = i;
        let mut lowest = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
            lowest = lowest.min(d);
        }
        // Every later row is at least this row's lowest.
        if lowest > max {
            return None;
        }
    }
    let d = rows[a.len()][b.len()];
    (d <= max).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_phrases_give_one_meaning_one_term() {
        let a = Analyzer::new();
        assert_eq!(a.terms("How much does it cost?"), a.terms("pricing"));
        assert_eq!(a.terms("licence"), a.terms("license"));
        let lost = a.terms("What happens if I lose my connection?");
        assert!(lost.contains(&a.terms("reconnect")[0]), "{lost:?}");
        let drops = a.terms("my connection keeps dropping");
        assert!(drops.contains(&a.terms("disconnected")[0]), "{drops:?}");
        // "connect" alone is not a disconnection.
        let connect = a.terms("connect you with support");
        assert!(!connect.contains(&a.terms("offline")[0]), "{connect:?}");
    }

    #[test]
    fn words_stay_apart_across_line_breaks_and_underscores() {
        let a = Analyzer::new();
        // Any non-ASCII character makes the tokenizer transliterate the whole text.
        let terms = a.terms("Café internal\nnotes in allowed_origins");
        assert_eq!(terms, ["cafe", "intern", "note", "allow", "origin"]);
    }

    #[test]
    fn misspelt_words_are_corrected_against_the_vocabulary() {
        let a = Analyzer::new();
        let vocabulary: HashMap<String, u32> = [
            ("open", 1),
            ("source", 1),
            ("which", 1),
            ("human", 1),
            ("connection", 5),
            ("cost", 2),
            ("close", 1),
            ("does", 3),
            ("assistant", 4),
        ]
        .into_iter()
        .map(|(w, n)| (w.to_owned(), n))
        .collect();
        let known = |t: &str| ["connect", "cost", "assist"].contains(&t);
        assert_eq!(
            a.correct("how dose it cots, my conection", &vocabulary, known),
            "how does it cost, my connection"
        );
        assert_eq!(
            a.correct("the asistant reconnected", &vocabulary, known),
            "the assistant reconnected"
        );
        // Short words: only swapped neighbours or a stop word, never another word one
        // letter away; longer ones keep their first letter.
        assert_eq!(a.correct("cats", &vocabulary, known), "cats");
        assert_eq!(a.correct("clase", &vocabulary, known), "clase");
        assert_eq!(a.correct("xonnection", &vocabulary, known), "xonnection");
        assert_eq!(a.correct("wich", &vocabulary, known), "which");
        assert_eq!(a.correct("whic", &vocabulary, known), "which");
        assert_eq!(a.correct("whichh", &vocabulary, known), "whichh");
        assert_eq!(a.correct("opensource?", &vocabulary, known), "open source?");
        assert_eq!(a.correct("humen", &vocabulary, known), "human");
        assert_eq!(a.correct("zzzzzz", &vocabulary, known), "zzzzzz");
    }

    #[test]
    fn distances_count_swaps_as_one_and_stop_early() {
        let d = |a: &str, b: &str, max| {
            distance(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
                max,
            )
        };
        assert_eq!(d("cots", "cost", 2), Some(1));
        assert_eq!(d("recconect", "reconnect", 2), Some(2));
        assert_eq!(d("kitten", "sitting", 3), Some(3));
        assert_eq!(d("kitten", "sitting", 2), None);
        assert_eq!(
            words("what's up, Ünïcode?").collect::<Vec<_>>(),
            [(0, "what"), (5, "s"), (7, "up"), (11, "Ünïcode")]
        );
    }
}
