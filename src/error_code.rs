//! Every stable error code a client can receive from Parlor, in one enum.
//!
//! A code travels in an HTTP error body (`{"error":{"code","message"}}`), in a WebSocket
//! `error` frame (`/ws` and `/chat`), or in a system message's `data.error`. Each
//! [`ErrorCode`] variant is declared once, beside its string; `docs/protocol.md` (section 7)
//! lists every one, and a test here checks that it does.

use std::fmt;

/// Declares [`ErrorCode`] with each variant beside its wire string.
macro_rules! error_codes {
    ($($(#[$meta:meta])* $variant:ident = $code:literal,)*) => {
        /// A stable snake_case error code, sent as its string ([`ErrorCode::as_str`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $(
                #[doc = concat!("`", $code, "`")]
                $(#[$meta])*
                $variant,
            )*
        }

        impl ErrorCode {
            /// Every code, in declaration order.
            pub const ALL: &[ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code's string on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    InvalidJson = "invalid_json",
    InvalidFrame = "invalid_frame",
    UnknownType = "unknown_type",
    UnsupportedFrame = "unsupported_frame",
    RateLimited = "rate_limited",
    FrameTooLarge = "frame_too_large",
    MessageTooLong = "message_too_long",
    EmptyMessage = "empty_message",
    InvalidRoomId = "invalid_room_id",
    InvalidClientMessageId = "invalid_client_message_id",
    InvalidMessage = "invalid_message",
    InvalidData = "invalid_data",
    NotJoined = "not_joined",
    TooManyRooms = "too_many_rooms",
    AuthNotAllowed = "auth_not_allowed",
    Forbidden = "forbidden",
    RoomNotFound = "room_not_found",
    StoreUnavailable = "store_unavailable",
    InvalidToken = "invalid_token",
    UnknownDomain = "unknown_domain",
    OriginNotAllowed = "origin_not_allowed",
    AiUnavailable = "ai_unavailable",
    BudgetExceeded = "budget_exceeded",
    InvalidConversationId = "invalid_conversation_id",
    InvalidDocumentName = "invalid_document_name",
    EmptyDocument = "empty_document",
    DocumentNotFound = "document_not_found",
    InvalidDomain = "invalid_domain",
    DomainNotFound = "domain_not_found",
    KeyNotFound = "key_not_found",
    DomainInConfigFile = "domain_in_config_file",
    InvalidUserId = "invalid_user_id",
    InvalidRole = "invalid_role",
    InvalidTtl = "invalid_ttl",
    TooManyConnections = "too_many_connections",
    RequestTimeout = "request_timeout",
    ShuttingDown = "shutting_down",
    InvalidQuery = "invalid_query",
    InvalidBody = "invalid_body",
    UnsupportedMediaType = "unsupported_media_type",
    PayloadTooLarge = "payload_too_large",
    NotFound = "not_found",
    MethodNotAllowed = "method_not_allowed",
    UpgradeRequired = "upgrade_required",
    InvalidTransition = "invalid_transition",
    NoHandoff = "no_handoff",
    HandoffDisabled = "handoff_disabled",
    InvalidAgent = "invalid_agent",
    InvalidStatus = "invalid_status",
    InvalidReason = "invalid_reason",
    DevLoginDisabled = "dev_login_disabled",
    DevLoginLocalOnly = "dev_login_local_only",
    InvalidCredentials = "invalid_credentials",
    TooManyFailures = "too_many_failures",
    NotSignedIn = "not_signed_in",
    CrossSite = "cross_site",
    WeakPassword = "weak_password",
    InvalidInvite = "invalid_invite",
    InvalidEmail = "invalid_email",
    InvalidName = "invalid_name",
    AccountExists = "account_exists",
    AccountNotFound = "account_not_found",
    Internal = "internal",
    MissingToken = "missing_token",
    MissingTemplateId = "missing_template_id",
    TemplateNotFound = "template_not_found",
    InvalidTemplate = "invalid_template",
    TemplateInConfig = "template_in_config",
    SessionNotFound = "session_not_found",
    SessionBusy = "session_busy",
    SessionComplete = "session_complete",
    SessionLost = "session_lost",
    AnswerTooLong = "answer_too_long",
    SessionTooLong = "session_too_long",
    Replaced = "replaced",
    AiServiceUnavailable = "ai_service_unavailable",
    AiServiceRejected = "ai_service_rejected",
    DocumentExternal = "document_external",
    InvalidGrace = "invalid_grace",
    InvalidNotificationType = "invalid_notification_type",
    InvalidTaskId = "invalid_task_id",
    InvalidOrgId = "invalid_org_id",
    InvalidTimestamp = "invalid_timestamp",
    TooManyNotifications = "too_many_notifications",
    InvalidMessageIds = "invalid_message_ids",
    InvalidSocketId = "invalid_socket_id",
    InvalidChannel = "invalid_channel",
    NoPusherApp = "no_pusher_app",
    InvalidUpload = "invalid_upload",
    FileTooLarge = "file_too_large",
    FileTypeNotAllowed = "file_type_not_allowed",
    FileNotFound = "file_not_found",
    TooManyFiles = "too_many_files",
    InvalidAttachments = "invalid_attachments",
    FilesUnavailable = "files_unavailable",
    ///
    /// A configured AI provider that cannot be built (`ai.providers`): the server does not
    /// start, so no client receives it.
    InvalidProvider = "invalid_provider",
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::ErrorCode;

    const PROTOCOL: &str = include_str!("../docs/protocol.md");

    /// Codes no client receives, so `docs/protocol.md` need not list them.
    const NOT_SENT: &[ErrorCode] = &[ErrorCode::InvalidProvider];

    /// The codes in the first column of section 7's table.
    fn documented() -> Vec<&'static str> {
        let start = PROTOCOL
            .find("\n## 7. Error codes")
            .unwrap_or_else(|| panic!("protocol.md has no section 7, Error codes"));
        let section = &PROTOCOL[start + 1..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        section
            .lines()
            .filter_map(|line| line.strip_prefix("| `"))
            .filter_map(|rest| rest.split_once('`').map(|(code, _)| code))
            .collect()
    }

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "{s} is declared twice");
            assert!(
                !s.is_empty()
                    && s.starts_with(|c: char| c.is_ascii_lowercase())
                    && !s.ends_with('_')
                    && !s.contains("__")
                    && s.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{s} is not snake_case"
            );
        }
    }

    #[test]
    fn protocol_md_lists_every_code() {
        let documented = documented();
        let missing: Vec<&str> = ErrorCode::ALL
            .iter()
            .filter(|c| !NOT_SENT.contains(c))
            .map(|c| c.as_str())
            .filter(|s| !PROTOCOL.contains(&format!("`{s}`")) || !documented.contains(s))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/protocol.md section 7 does not list {missing:?}"
        );
    }

    #[test]
    fn section_7_lists_only_codes_of_the_enum() {
        let documented = documented();
        assert!(
            documented.len() >= 50,
            "section 7's table was not read: {documented:?}"
        );
        let unknown: Vec<&str> = documented
            .into_iter()
            .filter(|d| !ErrorCode::ALL.iter().any(|c| c.as_str() == *d))
            .collect();
        assert!(
            unknown.is_empty(),
            "section 7 lists codes ErrorCode lacks: {unknown:?}"
        );
    }

    #[test]
    fn display_and_serialize_give_the_code() {
        for code in ErrorCode::ALL {
            assert_eq!(code.to_string(), code.as_str());
            assert_eq!(
                serde_json::to_value(code).ok(),
                Some(serde_json::Value::String(code.as_str().to_owned()))
            );
        }
    }
}
