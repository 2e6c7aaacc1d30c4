//! Pusher's signatures and a raw protocol-7 client, for tests that speak to `/app/{key}`
//! and `/apps/{id}/…` without the npm packages.

use hmac::Mac;
use serde_json::{Value, json};

use super::Client;

/// The demo app's key and secret in the Pusher tests.
pub const APP_KEY: &str = "app-key";
pub const APP_SECRET: &str = "app-secret-0123456789";

/// Hex HMAC-SHA256 of `text` with `secret`.
pub fn hmac_hex(secret: &str, text: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(text);
    hex::encode(mac.finalize().into_bytes())
}

/// The query of a request to `path` signed as the `pusher` SDK signs it, with the demo
/// app's key, `timestamp` seconds from now, with `secret`.
pub fn signed_query(method: &str, path: &str, body: &str, secret: &str, timestamp: i64) -> String {
    use md5::Digest;
    let mut params = vec![
        ("auth_key".to_owned(), APP_KEY.to_owned()),
        (
            "auth_timestamp".to_owned(),
            (chrono::Utc::now().timestamp() + timestamp).to_string(),
        ),
        ("auth_version".to_owned(), "1.0".to_owned()),
    ];
    if !body.is_empty() {
        params.push((
            "body_md5".to_owned(),
            hex::encode(md5::Md5::digest(body.as_bytes())),
        ));
    }
    params.sort();
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let query = query.join("&");
    let signature = hmac_hex(secret, format!("{method}\n{path}\n{query}").as_bytes());
    format!("{query}&auth_signature={signature}")
}

/// A signed GET of the HTTP API at `base` (`http://host:port`): status and body.
pub async fn get(base: &str, path: &str, params: &str) -> (u16, Value) {
    let query = signed_query("GET", path, "", APP_SECRET, 0);
    let query = if params.is_empty() {
        query
    } else {
        // The signature covers every parameter: sign them with the auth ones.
        let mut all: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.starts_with("auth_signature="))
            .chain(params.split('&'))
            .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        all.sort();
        let joined: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let joined = joined.join("&");
        let signature = hmac_hex(APP_SECRET, format!("GET\n{path}\n{joined}").as_bytes());
        format!("{joined}&auth_signature={signature}")
    };
    let res = reqwest::get(format!("{base}{path}?{query}")).await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// A protocol-7 connection to the demo app.
pub struct PusherClient {
    pub ws: Client,
    pub socket_id: String,
}

impl PusherClient {
    /// Connects to `ws_base` (`ws://host:port`) and reads `pusher:connection_established`.
    pub async fn connect(ws_base: &str) -> Self {
        let mut ws = Client::connect(&format!("{ws_base}/app/{APP_KEY}?protocol=7")).await;
        let hello = ws.recv().await;
        assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
        let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
        let socket_id = data["socket_id"].as_str().unwrap().to_owned();
        Self { ws, socket_id }
    }

    /// Subscribes to `channel` (a presence channel as `user`) and waits for success.
    pub async fn subscribe(&mut self, channel: &str, user: Option<&str>) {
        let mut data = json!({ "channel": channel });
        if channel.starts_with("private-") || channel.starts_with("presence-") {
            let mut signed = format!("{}:{channel}", self.socket_id);
            if let Some(user) = user {
                let member = json!({ "user_id": user }).to_string();
                signed = format!("{signed}:{member}");
                data["channel_data"] = json!(member);
            }
            data["auth"] = json!(format!(
                "{APP_KEY}:{}",
                hmac_hex(APP_SECRET, signed.as_bytes())
            ));
        }
        self.ws
            .send(json!({ "event": "pusher:subscribe", "data": data }))
            .await;
        loop {
            let frame = self.ws.recv().await;
            if frame["event"] == "pusher_internal:subscription_succeeded"
                && frame["channel"] == channel
            {
                return;
            }
            assert_ne!(frame["event"], "pusher:subscription_error", "{frame}");
        }
    }

    /// Ends the subscription to `channel`.
    pub async fn unsubscribe(&mut self, channel: &str) {
        self.ws
            .send(json!({ "event": "pusher:unsubscribe", "data": { "channel": channel } }))
            .await;
    }
}
