//! Knowledge bases: a domain's Markdown and text documents, cut into passages and ranked
//! with BM25, and the provider that answers from them alone.
//!
//! - Documents are cut at Markdown headings, then at paragraphs, into passages of at most
//!   [`MAX_PASSAGE_CHARS`]. A passage keeps its heading and its document's title.
//! - Text becomes terms in [`analysis`]: stems without stop words, one term per meaning
//!   (an alias table: `cost` is `price`), phrases (`lose` near `connection` adds
//!   `disconnect`), and a question's misspelt words corrected against the documents'.
//! - A passage is scored over three fields, its text, its heading (times
//!   [`HEADING_WEIGHT`]: a help page's headings name what their passage answers) and its
//!   document's title (times [`TITLE_WEIGHT`]). Each field's term weights are BM25's
//!   (saturated term frequency, normalised by the field's length: the `bm25` crate's
//!   embedder); a term's rarity (idf) is counted over whole passages.
//! - [`Hit::confidence`] is the share of the question's terms, weighted by rarity, that the
//!   passage holds. Passages rank by score times confidence, so one that answers the whole
//!   question beats one whose heading shares a single rare word with it.
//!   [`KnowledgeBase::reply`] answers with the best passage only when its confidence is
//!   above [`MIN_CONFIDENCE`]: a question about something else gets no answer rather than
//!   a passage that shares a word or two with it.
//! - [`KbProvider`] answers with the passage's own text and names it in an
//!   [`Event::Sources`]; small talk ([`small_talk`]) gets a short polite line instead.
//! - A knowledge base is immutable; re-indexing builds a new one and swaps it in.
//!
//! Depends on the AI provider types of [`super`] and the `bm25` crate.

mod analysis;
mod small_talk;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bm25::{Embedder, EmbedderBuilder, Tokenizer};

use super::{
    ChatRequest, Event, EventStream, FinishReason, Provider, ProviderError, Source, Speaker, Usage,
};
use analysis::Analyzer;

/// Longest passage, in characters.
pub const MAX_PASSAGE_CHARS: usize = 1200;

/// Largest document read, in bytes; larger files are skipped with a warning.
pub const MAX_DOCUMENT_BYTES: u64 = 2 * 1024 * 1024;

/// How much a match in a passage's heading counts against one in its text.
pub const HEADING_WEIGHT: f32 = 2.5;

/// How much a match in the title of a passage's document counts against one in its text.
pub const TITLE_WEIGHT: f32 = 0.5;

/// The [`Hit::confidence`] the best passage must exceed to be given as an answer: it must
/// hold more than half of what the question is about, weighed by rarity. A question of
/// two words of which the passage holds one is not answered.
pub const MIN_CONFIDENCE: f32 = 0.5;

/// The demo domain's documents, compiled into the binary: help pages about Parlor.
pub const DEMO_DOCUMENTS: &[(&str, &str)] = &[
    (
        "what-is-parlor.md",
        include_str!("../../kb/demo/what-is-parlor.md"),
    ),
    (
        "ai-assistant.md",
        include_str!("../../kb/demo/ai-assistant.md"),
    ),
    (
        "lost-connection.md",
        include_str!("../../kb/demo/lost-connection.md"),
    ),
    (
        "talking-to-a-person.md",
        include_str!("../../kb/demo/talking-to-a-person.md"),
    ),
    (
        "pricing-and-licence.md",
        include_str!("../../kb/demo/pricing-and-licence.md"),
    ),
    ("limits.md", include_str!("../../kb/demo/limits.md")),
    (
        "privacy-and-data.md",
        include_str!("../../kb/demo/privacy-and-data.md"),
    ),
    (
        "chat-widget.md",
        include_str!("../../kb/demo/chat-widget.md"),
    ),
];

/// One retrievable piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    /// The document's name (its path inside the knowledge folder).
    pub source: String,
    /// The document's title: its first `#` heading, else its file name.
    pub title: String,
    /// The heading the passage sits under, if any.
    pub heading: Option<String>,
    /// The passage's text.
    pub text: String,
}

impl Passage {
    /// Where the passage comes from, as a reply names it.
    pub fn cite(&self) -> Source {
        Source {
            title: self.title.clone(),
            document: self.source.clone(),
            heading: self.heading.clone(),
        }
    }
}

/// A passage found for a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<'a> {
    /// The passage.
    pub passage: &'a Passage,
    /// Its rank: the BM25 score of its text, heading and title, weighted, times its
    /// confidence (higher is better).
    pub score: f32,
    /// How much of the question it covers, 0 to 1: the rarity-weighted share of the
    /// question's terms found in the passage, its heading or its title. A term no document
    /// holds weighs as much as the rarest one that is held.
    pub confidence: f32,
}

/// What the knowledge base says to a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<'a> {
    /// Small talk: a short polite line.
    SmallTalk(&'static str),
    /// The passage that answers it.
    Answer(Hit<'a>),
    /// Nothing it holds answers it well enough.
    Nothing,
}

/// Splits pre-analysed text, whose terms are joined by spaces, back into its terms: the
/// BM25 embedder sees [`Analyzer`]'s terms, not raw text.
#[derive(Debug, Default)]
struct Terms;

impl Tokenizer for Terms {
    fn tokenize(&self, input_text: &str) -> Vec<String> {
        input_text
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// The parts of a passage that are scored, in the order of [`FIELD_WEIGHTS`].
const FIELDS: usize = 3;

/// How much a match in each field counts: the text, the heading, the document's title.
const FIELD_WEIGHTS: [f32; FIELDS] = [1.0, HEADING_WEIGHT, TITLE_WEIGHT];

/// Each field's BM25 term weights (term frequency, saturated and normalised by the
/// field's length) for every passage: `weights[passage][term][field]`. The `bm25` crate's
/// embedder computes them, fitted to each field's average length.
fn field_weights(fields: [&[Vec<String>]; FIELDS]) -> Vec<HashMap<String, [f32; FIELDS]>> {
    let passages = fields[0].len();
    let mut weights = vec![HashMap::<String, [f32; FIELDS]>::new(); passages];
    for (f, terms) in fields.into_iter().enumerate() {
        let joined: Vec<String> = terms.iter().map(|t| t.join(" ")).collect();
        let corpus: Vec<&str> = joined.iter().map(String::as_str).collect();
        let embedder: Embedder<u32, Terms> =
            EmbedderBuilder::with_tokenizer_and_fit_to_corpus(Terms, &corpus).build();
        for (i, text) in joined.iter().enumerate() {
            // The embedding holds one value per token, in the tokens' order.
            let embedding = embedder.embed(text);
            for (term, value) in terms[i].iter().zip(embedding.values()) {
                weights[i].entry(term.clone()).or_insert([0.0; FIELDS])[f] = *value;
            }
        }
    }
    weights
}

/// A domain's indexed documents.
pub struct KnowledgeBase {
    passages: Vec<Passage>,
    /// Each passage's terms with their weight in each field (see [`field_weights`]).
    weights: Vec<HashMap<String, [f32; FIELDS]>>,
    /// Which passages hold each term.
    postings: HashMap<String, Vec<usize>>,
    /// Every word of the documents and the alias table with its count, for correcting
    /// misspelt questions.
    vocabulary: HashMap<String, u32>,
    analyzer: Analyzer,
    documents: usize,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("documents", &self.documents)
            .field("passages", &self.passages.len())
            .finish()
    }
}

impl KnowledgeBase {
    /// Indexes `documents` (name, text).
    pub fn new<N: Into<String>, T: AsRef<str>>(
        documents: impl IntoIterator<Item = (N, T)>,
    ) -> Self {
        let analyzer = Analyzer::new();
        let mut passages = Vec::new();
        let mut vocabulary: HashMap<String, u32> = HashMap::new();
        let mut count = 0;
        for (name, text) in documents {
            count += 1;
            let text = text.as_ref();
            for (_, word) in analysis::words(text) {
                *vocabulary.entry(word.to_lowercase()).or_insert(0) += 1;
            }
            passages.extend(split(&name.into(), text));
        }
        for word in Analyzer::table_words() {
            vocabulary.entry(word.to_owned()).or_insert(0);
        }
        let analysed = |part: &dyn Fn(&Passage) -> &str| -> Vec<Vec<String>> {
            passages.iter().map(|p| analyzer.terms(part(p))).collect()
        };
        let text = analysed(&|p| &p.text);
        // A heading names its topic once: a word repeated in it, or two words of one alias
        // group ("human agent"), do not make it more about that topic.
        let once = |mut terms: Vec<Vec<String>>| {
            for t in &mut terms {
                let mut seen = HashSet::new();
                t.retain(|term| seen.insert(term.clone()));
            }
            terms
        };
        let heading = once(analysed(&|p| p.heading.as_deref().unwrap_or_default()));
        let title = once(analysed(&|p| &p.title));
        let weights = field_weights([&text, &heading, &title]);
        let mut postings: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, terms) in weights.iter().enumerate() {
            for term in terms.keys() {
                postings.entry(term.clone()).or_default().push(i);
            }
        }
        Self {
            passages,
            weights,
            postings,
            vocabulary,
            analyzer,
            documents: count,
        }
    }

    /// The demo domain's shipped documents.
    pub fn demo() -> Self {
        Self::new(DEMO_DOCUMENTS.iter().copied())
    }

    /// Indexes every `.md`, `.markdown` and `.txt` file under `dir` (recursively).
    pub fn load_dir(dir: &Path) -> std::io::Result<Self> {
        Ok(Self::new(read_dir(dir)?))
    }

    /// How many documents and passages it holds.
    pub fn size(&self) -> (usize, usize) {
        (self.documents, self.passages.len())
    }

    /// The reply to `message`: small talk gets a polite line; a question, the best passage
    /// when its confidence is above [`MIN_CONFIDENCE`]; anything else, nothing.
    pub fn reply(&self, message: &str) -> Reply<'_> {
        if let Some(line) = small_talk::reply(message) {
            return Reply::SmallTalk(line);
        }
        match self.search(message, 1).into_iter().next() {
            Some(hit) if hit.confidence > MIN_CONFIDENCE => Reply::Answer(hit),
            _ => Reply::Nothing,
        }
    }

    /// Up to `limit` passages for `query`, best first, whatever their confidence.
    pub fn search(&self, query: &str, limit: usize) -> Vec<Hit<'_>> {
        let corrected = self
            .analyzer
            .correct(query, &self.vocabulary, |t| self.postings.contains_key(t));
        let (mut terms, explained) = self.analyzer.explained_terms(&corrected);
        let mut seen = HashSet::new();
        terms.retain(|t| seen.insert(t.clone()));
        let candidates: HashSet<usize> = terms
            .iter()
            .filter_map(|t| self.postings.get(t))
            .flatten()
            .copied()
            .collect();
        // Relevance times coverage: a passage whose heading matches one rare word of the
        // question ranks below one that answers all of it.
        let mut ranked: Vec<(usize, f32, f32)> = candidates
            .into_iter()
            .map(|i| {
                let confidence = self.confidence(&terms, &explained, i);
                (i, self.bm25(&terms, i) * confidence, confidence)
            })
            .filter(|(_, score, _)| *score > 0.0)
            .collect();
        // Ties go to the earlier passage, so the same question always gets the same answer.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
            .into_iter()
            .take(limit)
            .filter_map(|(i, score, confidence)| {
                Some(Hit {
                    passage: self.passages.get(i)?,
                    score,
                    confidence,
                })
            })
            .collect()
    }

    /// BM25's inverse document frequency of a term held by `df` passages; a term held by
    /// none weighs as one held by one.
    fn idf(&self, df: usize) -> f32 {
        #[allow(clippy::cast_precision_loss)]
        let (n, df) = (self.passages.len() as f32, df.max(1) as f32);
        (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
    }

    fn frequency(&self, term: &str) -> usize {
        self.postings.get(term).map_or(0, Vec::len)
    }

    /// Passage `i`'s BM25 score for `query`: each term's idf (over whole passages) times
    /// its BM25 weights in the passage's fields, weighted by [`FIELD_WEIGHTS`].
    fn bm25(&self, query: &[String], i: usize) -> f32 {
        let Some(weights) = self.weights.get(i) else {
            return 0.0;
        };
        query
            .iter()
            .filter_map(|t| {
                let w = weights.get(t)?;
                let fields: f32 = w.iter().zip(FIELD_WEIGHTS).map(|(v, k)| v * k).sum();
                Some(self.idf(self.frequency(t)) * fields)
            })
            .sum()
    }

    /// The rarity-weighted share of `query` found in passage `i` (see [`Hit::confidence`]).
    fn confidence(&self, query: &[String], explained: &[(String, String)], i: usize) -> f32 {
        let Some(weights) = self.weights.get(i) else {
            return 0.0;
        };
        let mut total = 0.0;
        let mut found = 0.0;
        for term in query {
            let w = self.idf(self.frequency(term));
            total += w;
            // A word of a phrase is answered by a passage that holds what the phrase means.
            let held = weights.get(term).or_else(|| {
                explained
                    .iter()
                    .filter(|(part, _)| part == term)
                    .find_map(|(_, meaning)| weights.get(meaning))
            });
            if held.is_some() {
                found += w;
            }
        }
        if total > 0.0 { found / total } else { 0.0 }
    }
}

/// Every `.md`, `.markdown` and `.txt` document under `dir` (recursively): (path inside
/// `dir`, text), by name.
pub fn read_dir(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut documents = Vec::new();
    collect(dir, dir, &mut documents)?;
    documents.sort();
    Ok(documents)
}

/// What changes when a document under `dir` is added, removed or edited: the number of
/// files, their total size and the latest modification time.
pub fn folder_stamp(dir: &Path) -> std::io::Result<(u64, u64, std::time::SystemTime)> {
    fn walk(dir: &Path, acc: &mut (u64, u64, std::time::SystemTime)) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), acc)?;
            } else {
                acc.0 += 1;
                acc.1 += meta.len();
                if let Ok(m) = meta.modified() {
                    acc.2 = acc.2.max(m);
                }
            }
        }
        Ok(())
    }
    let mut acc = (0, 0, std::time::SystemTime::UNIX_EPOCH);
    walk(dir, &mut acc)?;
    Ok(acc)
}

/// Whether `name` may name an uploaded document: 1–128 characters of `A-Z a-z 0-9 . _ -`,
/// ending in `.md`, `.markdown` or `.txt`.
pub fn valid_document_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
        && [".md", ".markdown", ".txt"]
            .iter()
            .any(|e| name.ends_with(e))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        let wanted = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "md" | "markdown" | "txt"));
        if !kind.is_file() || !wanted {
            continue;
        }
        if entry.metadata()?.len() > MAX_DOCUMENT_BYTES {
            tracing::warn!(path = %path.display(), "knowledge document larger than 2 MiB; skipped");
            continue;
        }
        let name = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        match std::fs::read_to_string(&path) {
            Ok(text) => out.push((name, text)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "knowledge document unreadable; skipped");
            }
        }
    }
    Ok(())
}

/// A Markdown heading line's level and text (`## Returns` → 2, "Returns").
fn heading_of(line: &str) -> Option<(usize, &str)> {
    let line = line.trim();
    let level = line.chars().take_while(|&c| c == '#').count();
    let rest = &line[level..];
    ((1..=6).contains(&level) && rest.starts_with([' ', '\t']))
        .then(|| (level, rest.trim().trim_end_matches('#').trim_end()))
        .filter(|(_, text)| !text.is_empty())
}

/// A document's title: its first `#` heading, else its file name without folder and
/// extension, in words (`shipping/next-day.md` → "Next day").
fn title_of(source: &str, text: &str) -> String {
    if let Some((_, title)) = text
        .lines()
        .filter_map(heading_of)
        .find(|(level, _)| *level == 1)
    {
        return title.to_owned();
    }
    let name = source.rsplit(['/', '\\']).next().unwrap_or(source);
    let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
    let words = stem.replace(['-', '_'], " ");
    let mut chars = words.trim().chars();
    chars.next().map_or_else(
        || source.to_owned(),
        |first| first.to_uppercase().chain(chars).collect(),
    )
}

/// Cuts a document into passages: at headings, then at paragraphs.
fn split(source: &str, text: &str) -> Vec<Passage> {
    let title = title_of(source, text);
    let mut passages = Vec::new();
    let mut heading: Option<String> = None;
    let mut current = String::new();
    let flush = |heading: &Option<String>, current: &mut String, passages: &mut Vec<Passage>| {
        let text = current.trim();
        if !text.is_empty() {
            passages.push(Passage {
                source: source.to_owned(),
                title: title.clone(),
                heading: heading.clone(),
                text: text.to_owned(),
            });
        }
        current.clear();
    };
    let text = text.replace("\r\n", "\n");
    for paragraph in text.split("\n\n") {
        let mut trimmed = paragraph.trim();
        // A heading starts a paragraph; text may follow it on the next line.
        let (first, rest) = trimmed.split_once('\n').unwrap_or((trimmed, ""));
        if let Some((_, title)) = heading_of(first) {
            flush(&heading, &mut current, &mut passages);
            heading = Some(title.to_owned());
            trimmed = rest.trim();
            if trimmed.is_empty() {
                continue;
            }
        }
        if !current.is_empty() && current.len() + trimmed.len() + 2 > MAX_PASSAGE_CHARS {
            flush(&heading, &mut current, &mut passages);
        }
        // A single paragraph longer than a passage is cut at a character boundary.
        let mut rest = trimmed;
        while rest.len() > MAX_PASSAGE_CHARS {
            let mut cut = MAX_PASSAGE_CHARS;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            let cut = rest[..cut]
                .rfind(char::is_whitespace)
                .filter(|&c| c > 0)
                .unwrap_or(cut);
            current.push_str(&rest[..cut]);
            flush(&heading, &mut current, &mut passages);
            rest = rest[cut..].trim_start();
        }
        if !current.is_empty() {
            current.push_str("\n\n");
        }
        current.push_str(rest);
    }
    flush(&heading, &mut current, &mut passages);
    passages
}

/// Answers from a knowledge base alone (see [`KnowledgeBase::reply`]): the best passage's
/// own text, followed by an [`Event::Sources`] naming it; a polite line to small talk; and
/// [`ProviderError::NoAnswer`] when no passage is a confident answer. Needs no network, so
/// it is the last resort of every fallback chain and the demo's default.
#[derive(Debug, Clone)]
pub struct KbProvider {
    kb: Arc<KnowledgeBase>,
}

impl KbProvider {
    /// A provider answering from `kb`.
    pub fn new(kb: Arc<KnowledgeBase>) -> Self {
        Self { kb }
    }
}

#[async_trait]
impl Provider for KbProvider {
    fn kind(&self) -> &'static str {
        "kb"
    }

    async fn stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let question = request
            .turns
            .iter()
            .rev()
            .find(|t| t.speaker == Speaker::User)
            .map(|t| t.text.as_str())
            .unwrap_or_default();
        let (answer, sources) = match self.kb.reply(question) {
            Reply::SmallTalk(line) => (line.to_owned(), Vec::new()),
            Reply::Answer(hit) => (hit.passage.text.clone(), vec![hit.passage.cite()]),
            Reply::Nothing => return Err(ProviderError::NoAnswer),
        };
        // Streamed in word groups, so clients see the same deltas as from a vendor.
        let mut events: Vec<Result<Event, ProviderError>> = Vec::new();
        let mut piece = String::new();
        for (i, word) in answer.split_inclusive(char::is_whitespace).enumerate() {
            piece.push_str(word);
            if i % 8 == 7 {
                events.push(Ok(Event::Text(std::mem::take(&mut piece))));
            }
        }
        if !piece.is_empty() {
            events.push(Ok(Event::Text(piece)));
        }
        if !sources.is_empty() {
            events.push(Ok(Event::Sources(sources)));
        }
        events.push(Ok(Event::Finish {
            reason: FinishReason::Stop,
            usage: Usage::default(),
        }));
        Ok(Box::pin(futures_util::stream::iter(events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_headings_and_keep_them() {
        let p = split(
            "faq.md",
            "# Shipping\n\nWe ship in 2 days.\n\n## Returns\nReturns within 30 days.\n\nKeep the receipt.\n\n#hashtag",
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].title, "Shipping");
        assert_eq!(p[0].heading.as_deref(), Some("Shipping"));
        assert_eq!(p[0].text, "We ship in 2 days.");
        assert_eq!(p[1].heading.as_deref(), Some("Returns"));
        assert_eq!(
            p[1].text,
            "Returns within 30 days.\n\nKeep the receipt.\n\n#hashtag"
        );
        let long = "word ".repeat(1000);
        let p = split("notes/long-read_me.txt", &long);
        assert!(p.len() >= 4);
        assert!(p.iter().all(|p| p.text.len() <= MAX_PASSAGE_CHARS));
        assert_eq!(p[0].title, "Long read me");
        assert_eq!(p[0].heading, None);
    }

    #[test]
    fn headings_weigh_more_than_text() {
        let kb = KnowledgeBase::new([
            (
                "a.md",
                "# Help\n\n## Refunds\n\nAsk us within a month of your purchase.",
            ),
            (
                "b.md",
                "# Help\n\n## Opening hours\n\nWe are open every day. Refunds are handled by email.",
            ),
        ]);
        let hits = kb.search("refunds", 2);
        assert_eq!(hits[0].passage.source, "a.md", "{hits:?}");
        assert!(hits[0].score > hits[1].score);
    }

    #[test]
    fn the_demo_answers_only_what_it_holds() {
        let kb = KnowledgeBase::demo();
        let answer = |q: &str| match kb.reply(q) {
            Reply::Answer(hit) => Some(hit.passage.cite()),
            _ => None,
        };
        let cited = answer("How do I recover missed messages after I reconnect?");
        assert_eq!(
            cited.as_ref().map(|c| c.document.as_str()),
            Some("lost-connection.md"),
            "{cited:?}"
        );
        let cited = answer("Is it open source, what licence?");
        assert_eq!(cited.and_then(|c| c.heading), Some("Licence".to_owned()));
        assert_eq!(answer("zzzz qqqq"), None);
        assert_eq!(answer("What is the capital of France?"), None);
        assert!(matches!(kb.reply("thanks!"), Reply::SmallTalk(_)));
    }
}
