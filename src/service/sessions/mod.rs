//! Guided sessions: a signed-in user answers a template's questions one at a time, may
//! leave and come back to the same point, and ends with a document only they can read
//! (seed 003, the Largence `/chat` service). This module is the service; `/chat` is its
//! transport.
//!
//! Design:
//! - **Templates** ([`template`]) are per domain: questions with their checks, and a
//!   Markdown document with `{{question_id}}` placeholders. They come from files the config
//!   names and from the admin API, are checked whole when loaded (a placeholder naming no
//!   question, two questions with one id, a pattern that does not compile), and are then
//!   immutable values: a session keeps the template version it started with.
//! - **A session** is one (user, template) pair with at most one incomplete session. Its
//!   state is the history of questions asked and answers given; it is written to the store
//!   after every message and before anything is sent back, so a crash between two answers
//!   loses nothing that was acknowledged.
//! - **Who asks the next question** is either the domain's AI service (the seed's contract,
//!   `POST {url}/v1/chat/next-question {sessionId}`), with retries with back-off on 5xx and
//!   network errors, or the built-in guide: the template's questions in order, each answer
//!   checked ([`template::Question::check`]), an invalid one asked again with the reason,
//!   and the document rendered from the answers ([`template::Template::render`]).
//! - **Last connection wins** across nodes through the existing cluster claim: a second
//!   connection for the same session takes it over and the first is closed.
//! - **Cleanup** of incomplete sessions untouched for `sessions.stale_after` runs on one
//!   node at a time under a lease.

pub mod template;
