//! A domain's assistant and its knowledge: built from the bot settings, the knowledge
//! folder and the uploaded documents, and rebuilt when any of them changes.

use super::*;

/// How long "this domain has (no) uploaded documents" is believed before the store is
/// asked again.
pub(super) const UPLOADS_RECHECK: Duration = Duration::from_secs(10);
/// The assistant of a domain without a `[domains.bot]` section that has uploaded documents:
/// no vendor, its knowledge base only.
pub(super) static IMPLICIT_BOT: std::sync::LazyLock<BotConfig> =
    std::sync::LazyLock::new(BotConfig::default);

/// A domain's assistant, built from its [`BotConfig`] and its knowledge documents.
#[derive(Debug)]
pub struct Bot {
    pub(super) config: BotConfig,
    pub(super) chain: Vec<Arc<Slot>>,
    pub(super) kb: Option<Arc<KnowledgeBase>>,
    /// The uploads version the knowledge base was built from.
    pub(super) uploads: u64,
    /// The knowledge folder as it was when indexed, and when that was last checked.
    pub(super) folder: Mutex<(Option<FolderStamp>, Instant)>,
}

pub(super) type FolderStamp = (u64, u64, std::time::SystemTime);

impl AiService {
    /// The domain's assistant, or `None` when it has none (or it is disabled). Built on
    /// first use and again whenever the domain's bot settings, its uploaded documents or
    /// its knowledge folder (checked every `knowledge_check_secs`) change.
    ///
    /// A domain without a `[domains.bot]` section gets the built-in assistant (no vendor,
    /// answers from the knowledge base alone) as soon as it has uploaded documents; one whose
    /// section says `enabled = false` has none.
    pub async fn bot(&self, domain: &str) -> Option<Arc<Bot>> {
        let configured = {
            let table = self.domains.load();
            let settings = &table.get(domain)?.settings;
            match &settings.bot {
                Some(bot) if !bot.enabled => return None,
                Some(_) => true,
                None => false,
            }
        };
        if !configured && !self.has_uploads(domain).await {
            return None;
        }
        let table = self.domains.load();
        let current = match table.get(domain).and_then(|d| d.settings.bot.as_ref()) {
            Some(bot) if bot.enabled => bot,
            Some(_) => return None,
            None => &IMPLICIT_BOT,
        };
        let uploads = self.uploads.get(domain).map_or(0, |v| *v);
        let cached = self
            .bots
            .get(domain)
            .filter(|b| b.config == *current && b.uploads == uploads)
            .map(|b| Arc::clone(b.value()));
        if let Some(bot) = cached {
            if self.folder_unchanged(&bot).await {
                return Some(bot);
            }
            tracing::info!(domain, "knowledge folder changed; re-indexing");
        }
        let config = current.clone();
        drop(table);
        let dir = config
            .knowledge_dir
            .clone()
            .filter(|d| d != BUILTIN_DEMO_KNOWLEDGE);
        let builtin = config.knowledge_dir.as_deref() == Some(BUILTIN_DEMO_KNOWLEDGE);
        let mut documents: Vec<(String, String)> = Vec::new();
        if builtin {
            documents.extend(
                crate::ai::kb::DEMO_DOCUMENTS
                    .iter()
                    .map(|(n, t)| ((*n).to_owned(), (*t).to_owned())),
            );
        }
        let mut stamp = None;
        if let Some(dir) = dir.clone() {
            let read = tokio::task::spawn_blocking(move || {
                let path = std::path::Path::new(&dir);
                Ok::<_, std::io::Error>((
                    crate::ai::kb::read_dir(path)?,
                    crate::ai::kb::folder_stamp(path)?,
                ))
            })
            .await;
            match read {
                Ok(Ok((docs, s))) => {
                    documents.extend(docs);
                    stamp = Some(s);
                }
                Ok(Err(e)) => tracing::error!(domain, error = %e, "knowledge folder unreadable"),
                Err(_) => {}
            }
        }
        match self.chat.store().documents(domain).await {
            Ok(docs) => documents.extend(docs.into_iter().map(|(n, t, _)| (n, t))),
            Err(e) => tracing::error!(domain, error = %e, "uploaded knowledge unreadable"),
        }
        let kb = if documents.is_empty() {
            None
        } else {
            let kb = tokio::task::spawn_blocking(move || KnowledgeBase::new(documents))
                .await
                .ok()
                .map(Arc::new);
            if let Some(kb) = &kb {
                let (docs, passages) = kb.size();
                tracing::info!(domain, docs, passages, "knowledge base indexed");
            }
            kb
        };
        let chain = config
            .providers
            .iter()
            .filter_map(|name| {
                let slot = self.slots.get(name);
                if slot.is_none() {
                    tracing::warn!(domain, provider = %name, "bot names an unknown provider; skipped");
                }
                slot.cloned()
            })
            .collect();
        let bot = Arc::new(Bot {
            config,
            chain,
            kb,
            uploads,
            folder: Mutex::new((stamp, Instant::now())),
        });
        self.bots.insert(domain.to_owned(), Arc::clone(&bot));
        Some(bot)
    }

    /// Whether `bot`'s knowledge folder is as it was indexed (checked at most every
    /// `knowledge_check_secs`).
    pub(super) async fn folder_unchanged(&self, bot: &Bot) -> bool {
        let Some(dir) = bot
            .config
            .knowledge_dir
            .clone()
            .filter(|d| d != BUILTIN_DEMO_KNOWLEDGE)
        else {
            return true;
        };
        let known = {
            let mut folder = bot.folder.lock();
            if folder.1.elapsed() < Duration::from_secs(bot.config.knowledge_check_secs) {
                return true;
            }
            folder.1 = Instant::now();
            folder.0
        };
        let now = tokio::task::spawn_blocking(move || {
            crate::ai::kb::folder_stamp(std::path::Path::new(&dir)).ok()
        })
        .await
        .ok()
        .flatten();
        now == known
    }

    /// Whether a domain has uploaded knowledge documents: asked of the store again after a
    /// change on this node, or [`UPLOADS_RECHECK`] after the last answer (a change made
    /// through another node).
    pub(super) async fn has_uploads(&self, domain: &str) -> bool {
        let version = self.uploads.get(domain).map_or(0, |v| *v);
        if let Some(known) = self.upload_presence.get(domain)
            && known.0 == version
            && known.2.elapsed() < UPLOADS_RECHECK
        {
            return known.1;
        }
        let has = match self.chat.store().documents(domain).await {
            Ok(docs) => !docs.is_empty(),
            Err(e) => {
                tracing::warn!(domain, error = %e, "cannot tell whether the domain has documents");
                false
            }
        };
        self.upload_presence
            .insert(domain.to_owned(), (version, has, Instant::now()));
        has
    }

    /// A domain's uploaded knowledge documents: (name, bytes, updated), for administrators.
    pub async fn documents(
        &self,
        caller: &Identity,
        domain: &str,
    ) -> Result<Vec<(String, usize, chrono::DateTime<chrono::Utc>)>, ServiceError> {
        self.document_access(caller, domain)?;
        let docs = self.chat.store().documents(domain).await?;
        Ok(docs
            .into_iter()
            .map(|(n, t, at)| (n, t.len(), at))
            .collect())
    }

    /// Adds or replaces an uploaded knowledge document; the domain's knowledge base is
    /// re-indexed on its next question. True when it was new.
    pub async fn put_document(
        &self,
        caller: &Identity,
        domain: &str,
        name: &str,
        text: String,
    ) -> Result<bool, ServiceError> {
        self.document_access(caller, domain)?;
        if !crate::ai::kb::valid_document_name(name) {
            return Err(ServiceError::invalid(
                ErrorCode::InvalidDocumentName,
                "a document name is 1-128 characters of A-Z a-z 0-9 . _ - ending in .md, .markdown or .txt",
            ));
        }
        if text.trim().is_empty() {
            return Err(ServiceError::invalid(
                ErrorCode::EmptyDocument,
                "the document is empty",
            ));
        }
        let existed = self
            .chat
            .store()
            .documents(domain)
            .await?
            .iter()
            .any(|(n, _, _)| n == name);
        self.chat
            .store()
            .change_domains(crate::store::DomainChange::PutDocument {
                domain_id: domain.to_owned(),
                name: name.to_owned(),
                text,
            })
            .await?;
        *self.uploads.entry(domain.to_owned()).or_insert(0) += 1;
        Ok(!existed)
    }

    /// Deletes an uploaded knowledge document.
    pub async fn remove_document(
        &self,
        caller: &Identity,
        domain: &str,
        name: &str,
    ) -> Result<(), ServiceError> {
        self.document_access(caller, domain)?;
        let removed = self
            .chat
            .store()
            .change_domains(crate::store::DomainChange::RemoveDocument {
                domain_id: domain.to_owned(),
                name: name.to_owned(),
            })
            .await?;
        if removed == 0 {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DocumentNotFound,
                message: format!("domain {domain:?} has no document {name:?}"),
            });
        }
        *self.uploads.entry(domain.to_owned()).or_insert(0) += 1;
        Ok(())
    }

    pub(super) fn document_access(
        &self,
        caller: &Identity,
        domain: &str,
    ) -> Result<(), ServiceError> {
        if !crate::auth::policy::may_manage_domains(caller) {
            return Err(ServiceError::Forbidden(
                "managing knowledge needs an admin key".into(),
            ));
        }
        if self.domains.load().get(domain).is_none() {
            return Err(ServiceError::NotFound {
                code: ErrorCode::DomainNotFound,
                message: format!("no domain {domain:?}"),
            });
        }
        Ok(())
    }
}
