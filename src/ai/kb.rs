//! Knowledge bases: a domain's Markdown and text documents, cut into passages and indexed
//! for BM25 retrieval (the `bm25` crate: stemming, stop words, Unicode normalisation).
//!
//! - Documents are cut at Markdown headings, then at paragraphs, into passages of at most
//!   [`MAX_PASSAGE_CHARS`]; a passage keeps its heading so a question about the heading
//!   finds it.
//! - [`KnowledgeBase::search`] gives the best passages with their source file names; the AI
//!   layer puts them in the prompt, and [`KbProvider`] answers with the best one directly,
//!   so a domain without any AI vendor still answers from its documents.
//! - A knowledge base is immutable; re-indexing builds a new one and swaps it in.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bm25::{Language, SearchEngine, SearchEngineBuilder};

use super::{
    ChatRequest, Event, EventStream, FinishReason, Provider, ProviderError, Speaker, Usage,
};

/// Longest passage, in characters.
pub const MAX_PASSAGE_CHARS: usize = 1200;

/// Largest document read, in bytes; larger files are skipped with a warning.
pub const MAX_DOCUMENT_BYTES: u64 = 2 * 1024 * 1024;

/// The demo domain's documents, compiled into the binary.
pub const DEMO_DOCUMENTS: &[(&str, &str)] = &[
    (
        "about-parlor.md",
        include_str!("../../kb/demo/about-parlor.md"),
    ),
    ("connecting.md", include_str!("../../kb/demo/connecting.md")),
    (
        "limits-and-pricing.md",
        include_str!("../../kb/demo/limits-and-pricing.md"),
    ),
    (
        "talking-to-a-person.md",
        include_str!("../../kb/demo/talking-to-a-person.md"),
    ),
];

/// One retrievable piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    /// The document's name (its path inside the knowledge folder).
    pub source: String,
    /// The heading the passage sits under, if any.
    pub heading: Option<String>,
    /// The passage's text.
    pub text: String,
}

/// A passage found for a query.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit<'a> {
    /// The passage.
    pub passage: &'a Passage,
    /// Its BM25 score (higher is more relevant).
    pub score: f32,
}

/// A domain's indexed documents.
pub struct KnowledgeBase {
    passages: Vec<Passage>,
    engine: SearchEngine<u32>,
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
        let mut passages = Vec::new();
        let mut count = 0;
        for (name, text) in documents {
            count += 1;
            passages.extend(split(&name.into(), text.as_ref()));
        }
        let corpus: Vec<bm25::Document<u32>> = passages
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = u32::try_from(i).unwrap_or(u32::MAX);
                let text = match &p.heading {
                    Some(h) => format!("{h}\n{}", p.text),
                    None => p.text.clone(),
                };
                bm25::Document::new(id, text)
            })
            .collect();
        let engine = SearchEngineBuilder::<u32>::with_documents(Language::English, corpus).build();
        Self {
            passages,
            engine,
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

    /// Up to `limit` passages for `query`, best first.
    pub fn search(&self, query: &str, limit: usize) -> Vec<Hit<'_>> {
        self.engine
            .search(query, limit)
            .into_iter()
            .filter(|r| r.score > 0.0)
            .filter_map(|r| {
                let i = usize::try_from(r.document.id).ok()?;
                Some(Hit {
                    passage: self.passages.get(i)?,
                    score: r.score,
                })
            })
            .collect()
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

/// Cuts a document into passages: at headings, then at paragraphs.
fn split(source: &str, text: &str) -> Vec<Passage> {
    let mut passages = Vec::new();
    let mut heading: Option<String> = None;
    let mut current = String::new();
    let flush = |heading: &Option<String>, current: &mut String, passages: &mut Vec<Passage>| {
        let text = current.trim();
        if !text.is_empty() {
            passages.push(Passage {
                source: source.to_owned(),
                heading: heading.clone(),
                text: text.to_owned(),
            });
        }
        current.clear();
    };
    for paragraph in text.split("\n\n") {
        let trimmed = paragraph.trim();
        if let Some(title) = trimmed.strip_prefix('#')
            && !trimmed.contains('\n')
        {
            flush(&heading, &mut current, &mut passages);
            heading = Some(title.trim_start_matches('#').trim().to_owned());
            continue;
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

/// Answers from a knowledge base alone: the best passage for the question, with its
/// source. Needs no network, so it is the last resort of every fallback chain and the
/// demo's default.
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
        let hits = self.kb.search(question, 1);
        let Some(best) = hits.first() else {
            return Err(ProviderError::NoAnswer);
        };
        let answer = format!("{}\n\nSource: {}", best.passage.text, best.passage.source);
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
            "# Shipping\n\nWe ship in 2 days.\n\n## Returns\n\nReturns within 30 days.\n\nKeep the receipt.",
        );
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].heading.as_deref(), Some("Shipping"));
        assert_eq!(p[0].text, "We ship in 2 days.");
        assert_eq!(p[1].heading.as_deref(), Some("Returns"));
        assert_eq!(p[1].text, "Returns within 30 days.\n\nKeep the receipt.");
        let long = "word ".repeat(1000);
        let p = split("long.txt", &long);
        assert!(p.len() >= 4);
        assert!(p.iter().all(|p| p.text.len() <= MAX_PASSAGE_CHARS));
    }

    #[test]
    fn the_demo_answers_from_the_right_document() {
        let kb = KnowledgeBase::demo();
        let hits = kb.search("How do I recover missed messages after I reconnect?", 3);
        assert_eq!(hits[0].passage.source, "connecting.md", "{hits:?}");
        let hits = kb.search("Is it open source, what licence?", 3);
        assert_eq!(hits[0].passage.source, "limits-and-pricing.md", "{hits:?}");
        assert!(kb.search("zzzz qqqq", 3).is_empty());
    }
}
