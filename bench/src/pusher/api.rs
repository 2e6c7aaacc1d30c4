//! The publisher's side of the Pusher HTTP API: request signing and a minimal HTTP/1.1
//! client that keeps its connection alive.
//!
//! A request is signed as Pusher specifies (and as the `pusher` server SDKs do): the query
//! carries `auth_key`, `auth_timestamp`, `auth_version=1.0` and `body_md5` (hex MD5 of the
//! body), and `auth_signature` = hex HMAC-SHA256, with the app's secret, of
//! `METHOD\nPATH\nQUERY`, QUERY being those four parameters as `key=value`, sorted by key,
//! joined with `&`.
//!
//! The client is deliberately small: one request at a time per connection (no pipelining,
//! which not every server handles), `Content-Length` or chunked response bodies, a fresh
//! connection when the server closes one. The scenario opens as many connections as it
//! wants requests in flight.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A Pusher app's credentials, as the server under test is configured with them.
#[derive(Debug, Clone)]
pub struct App {
    /// The app id of the API's paths (`/apps/{id}/…`).
    pub id: String,
    /// The public key: the socket path's `/app/{key}` and the API's `auth_key`.
    pub key: String,
    /// Signs API requests.
    pub secret: String,
}

impl App {
    /// Checks that the id and key need no escaping in a path or query, which keeps the
    /// signed text and the sent text the same bytes.
    pub fn check(&self) -> Result<()> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
        };
        if !plain(&self.id) || !plain(&self.key) {
            bail!("--app-id and --key must be 1+ characters of A-Z a-z 0-9 - _ . : @");
        }
        if self.secret.is_empty() {
            bail!("--secret must not be empty");
        }
        Ok(())
    }

    /// The signed query string (without `?`) for `METHOD path` with `body`, at `timestamp`
    /// (seconds since the Unix epoch).
    pub fn signed_query(&self, method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
        let body_md5 = hex::encode(Md5::digest(body));
        // Already in key order: auth_key < auth_timestamp < auth_version < body_md5.
        let params = format!(
            "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}",
            self.key
        );
        format!(
            "{params}&auth_signature={}",
            self.signature(&format!("{method}\n{path}\n{params}"))
        )
    }

    /// hex(HMAC-SHA256(secret, text)).
    fn signature(&self, text: &str) -> String {
        // HMAC takes a key of any length; the error case cannot happen.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.secret.as_bytes()) else {
            return String::new();
        };
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The path of the events endpoint.
    pub fn events_path(&self) -> String {
        format!("/apps/{}/events", self.id)
    }
}

/// The JSON body of `POST /apps/{id}/events` for one event to one channel, `data` a string.
pub fn event_body(name: &str, channel: &str, data: &str) -> String {
    serde_json::json!({ "name": name, "channels": [channel], "data": data }).to_string()
}

/// An HTTP response, as far as the publisher cares.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The body, for error messages (the first bytes only).
    pub body: String,
}

/// One keep-alive HTTP/1.1 connection to the API, reopened when the server closes it.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    conn: Option<BufReader<TcpStream>>,
    /// Limit for one request: connect (if needed), write, and read the whole response.
    limit: Duration,
}

impl Client {
    pub fn new(addr: SocketAddr, limit: Duration) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            conn: None,
            limit,
        }
    }

    /// Sends `POST path_and_query` with a JSON body and reads the response. After an error
    /// the connection is dropped, and the next request opens a new one.
    pub async fn post_json(&mut self, path_and_query: &str, body: &str) -> Result<Response> {
        let request = format!(
            "POST {path_and_query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        let limit = self.limit;
        match timeout(limit, self.exchange(request.as_bytes())).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(anyhow!("no response within {limit:?}"))
            }
        }
    }

    async fn exchange(&mut self, request: &[u8]) -> Result<Response> {
        if self.conn.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("HTTP connect to {} failed", self.addr))?;
            stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
            self.conn = Some(BufReader::new(stream));
        }
        let Some(conn) = self.conn.as_mut() else {
            bail!("no connection");
        };
        conn.get_mut()
            .write_all(request)
            .await
            .context("writing the request failed")?;
        let (response, keep_alive) = read_response(conn).await?;
        if !keep_alive {
            self.conn = None;
        }
        Ok(response)
    }
}

/// Reads one response: status line, headers, body. Returns whether the connection may be
/// used again.
async fn read_response(conn: &mut BufReader<TcpStream>) -> Result<(Response, bool)> {
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        bail!("the server closed the connection before answering");
    }
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or_default().to_owned();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("malformed status line {:?}", line.trim_end()))?;
    let mut keep_alive = version == "HTTP/1.1";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            bail!("the connection ended inside the response headers");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().context("malformed Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                keep_alive = false;
            } else if value.contains("keep-alive") {
                keep_alive = true;
            }
        }
    }
    let body = if chunked {
        read_chunked(conn).await?
    } else if let Some(length) = length {
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await?;
        body
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        // No length: the body runs to the end of the connection.
        keep_alive = false;
        let mut body = Vec::new();
        conn.read_to_end(&mut body).await?;
        body
    };
    let mut body = String::from_utf8_lossy(&body).into_owned();
    body.truncate(body.floor_char_boundary(200));
    Ok((Response { status, body }, keep_alive))
}

/// Reads a chunked body (trailers are skipped).
async fn read_chunked(conn: &mut BufReader<TcpStream>) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let size = usize::from_str_radix(size.trim(), 16)
            .with_context(|| format!("malformed chunk size {:?}", line.trim_end()))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if conn.read_line(&mut line).await? == 0 || line.trim_end().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        conn.read_exact(&mut body[start..]).await?;
        line.clear();
        conn.read_line(&mut line).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Pusher's "HTTP API reference", section "Authentication".
    #[test]
    fn signs_as_pusher_documents() {
        let app = App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let query = app.signed_query("POST", "/apps/3/events", body.as_bytes(), 1_353_088_179);
        assert_eq!(
            query,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn event_body_carries_data_as_a_string() -> Result<()> {
        let v: serde_json::Value = serde_json::from_str(&event_body("e", "c", "t:1:2:x"))?;
        assert_eq!(v["name"], "e");
        assert_eq!(v["channels"][0], "c");
        assert_eq!(v["data"], "t:1:2:x");
        Ok(())
    }

    #[test]
    fn refuses_names_that_would_need_escaping() {
        let app = |id: &str, key: &str| App {
            id: id.into(),
            key: key.into(),
            secret: "s".into(),
        };
        assert!(app("bench", "bench-key").check().is_ok());
        assert!(app("a b", "k").check().is_err());
        assert!(app("a", "k&x=1").check().is_err());
    }

    #[tokio::test]
    async fn reads_length_and_chunked_responses_on_one_connection() -> Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await?;
            let mut buf = vec![0; 4096];
            let _ = socket.read(&mut buf).await?;
            socket
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")
                .await?;
            let _ = socket.read(&mut buf).await?;
            socket
                .write_all(
                    b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n\
                      4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
                )
                .await?;
            Ok::<_, std::io::Error>(())
        });
        let mut client = Client::new(addr, Duration::from_secs(5));
        let r = client.post_json("/apps/x/events?a=1", "{}").await?;
        assert_eq!((r.status, r.body.as_str()), (200, r#"{"ok":true}"#));
        let r = client.post_json("/apps/x/events?a=2", "{}").await?;
        assert_eq!((r.status, r.body.as_str()), (401, r#"{"a":1}"#));
        server.await??;
        Ok(())
    }
}
