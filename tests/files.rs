//! File attachments (`docs/files.md`): upload into a room, attach to messages over HTTP and
//! the WebSocket, read back by whoever may read the room and by nobody else, limits and
//! types decided from the bytes, malformed forms refused with nothing stored, deletion of
//! the bytes; and the same against a real S3 server.
//!
//! The S3 test needs an S3-compatible server (CI runs `moto_server`) at
//! `PARLOR_TEST_S3_URL` (`http://127.0.0.1:PORT`) and says it is skipped without it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{TestServer, chat_domain, status_and_body};
use object_store::ObjectStore as _;
use serde_json::{Value, json};

/// A 1×1 PNG.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0\x1f\x15\xc4\x89\0\0\0\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\0\x05\0\x01\xff\x89\x99=\x1d\0\0\0\0IEND\xaeB`\x82";
const BOUNDARY: &str = "parlor-test-boundary-7MA4YWxkTrZu0gW";

/// One part of a form: its field name, file name, content type and bytes.
struct Part<'a> {
    name: &'a str,
    file_name: Option<&'a str>,
    content_type: Option<&'a str>,
    bytes: &'a [u8],
}

fn room_field(room: &str) -> Part<'_> {
    Part {
        name: "roomId",
        file_name: None,
        content_type: None,
        bytes: room.as_bytes(),
    }
}

fn file_field<'a>(file_name: &'a str, content_type: &'a str, bytes: &'a [u8]) -> Part<'a> {
    Part {
        name: "file",
        file_name: Some(file_name),
        content_type: Some(content_type),
        bytes,
    }
}

/// A `multipart/form-data` body of `parts`.
fn form(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{}\"", p.name);
        if let Some(f) = p.file_name {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(t) = p.content_type {
            body.extend_from_slice(format!("Content-Type: {t}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(p.bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// `POST /api/files` with `body` sent as `content_type`.
async fn post_raw(s: &TestServer, token: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(s.http("/api/files"))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("upload");
    status_and_body(res).await
}

/// Uploads a form of `parts`.
async fn upload(s: &TestServer, token: &str, parts: &[Part<'_>]) -> (u16, Value) {
    post_raw(
        s,
        token,
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        form(parts),
    )
    .await
}

/// A GET of `path` with `token` as bearer (none: no header): status, headers, bytes.
async fn fetch(
    s: &TestServer,
    path: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(s.http(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.expect("get");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.bytes().await.expect("body").to_vec())
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Every file under `dir` (none when it does not exist).
fn stored_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p);
            }
        }
    }
    found
}

/// A server with the domains `shop` and `blog`, its files in `files`.
async fn server(files: &Path, configure: impl FnOnce(&mut parlor::config::Config)) -> TestServer {
    let files = files.to_path_buf();
    TestServer::start_with(move |c| {
        c.domains.push(chat_domain("shop", "Shop"));
        c.domains.push(chat_domain("blog", "Blog"));
        c.files.store = files.display().to_string();
        configure(c);
    })
    .await
}

/// Creates `room` as `token`'s with a first message.
async fn open_room(s: &TestServer, token: &str, room: &str) {
    let (status, body) = s
        .post_with(
            "/api/messages",
            token,
            &json!({ "message": "hello", "chatRoomId": room }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn room_messages(s: &TestServer, token: &str, room: &str) -> Vec<Value> {
    let (status, body) = s
        .get_with(&format!("/api/rooms/{room}/messages?limit=100"), token)
        .await;
    assert_eq!(status, 200, "{body}");
    body["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn members_attach_and_read_files_and_nobody_else_finds_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |_| {}).await;
    let ann = s.token_in("shop", "ann", "visitor");
    let bob = s.token_in("shop", "bob", "visitor");
    let agent = s.token_in("shop", "agent-1", "agent");
    let eve = s.token_in("blog", "eve", "visitor");
    open_room(&s, &ann, "ann-room").await;

    // The name loses its path; the type is the bytes'.
    let (status, png) = upload(
        &s,
        &ann,
        &[
            room_field("ann-room"),
            file_field("../../etc/pic.png", "application/octet-stream", PNG),
        ],
    )
    .await;
    assert_eq!(status, 201, "{png}");
    let id = png["fileId"].as_str().unwrap().to_owned();
    assert_eq!(png["name"], "pic.png");
    assert_eq!(png["size"], PNG.len());
    assert_eq!(png["contentType"], "image/png");
    assert_eq!(png["url"], format!("/api/files/{id}"));
    assert_eq!(png["roomId"], "ann-room");
    // Kept under the domain and the generated id, nothing of the name.
    let on_disk = stored_files(dir.path());
    assert_eq!(on_disk, [dir.path().join("shop").join(&id)]);
    assert_eq!(std::fs::read(&on_disk[0]).unwrap(), PNG);

    // Attached over HTTP: the server describes the file, whatever the client said.
    let (status, sent) = s
        .post_with(
            "/api/messages",
            &ann,
            &json!({
                "message": "my picture",
                "chatRoomId": "ann-room",
                "data": { "k": 1 },
                "attachments": [{ "fileId": id, "name": "forged.exe", "size": 1, "url": "https://evil.example/x" }],
            }),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    let described = json!({
        "fileId": id, "name": "pic.png", "size": PNG.len(), "contentType": "image/png",
        "url": format!("/api/files/{id}"),
    });
    assert_eq!(
        sent["data"],
        json!({ "k": 1, "attachments": [described.clone()] })
    );

    // Attached over the socket, a message of its attachment alone, delivered live.
    let (status, text) = upload(
        &s,
        &ann,
        &[
            room_field("ann-room"),
            file_field("notes.txt", "text/html", b"notes: <b>not html</b>\n"),
        ],
    )
    .await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(text["contentType"], "text/plain");
    let text_id = text["fileId"].as_str().unwrap().to_owned();
    let mut ws = common::Client::connect(&s.ws(&format!("/ws?token={ann}"))).await;
    ws.join("ann-room", None).await;
    let req = ws
        .request(json!({
            "type": "send-message", "roomId": "ann-room", "message": "",
            "attachments": [{ "fileId": text_id }],
        }))
        .await;
    let ack = ws.reply(&req).await;
    assert_eq!(ack["type"], "message-ack", "{ack}");
    let live = ws.recv_type("message-received").await;
    assert_eq!(live["data"]["attachments"][0]["fileId"], text_id.as_str());
    assert_eq!(live["data"]["attachments"][0]["name"], "notes.txt");
    assert_eq!(live["data"]["attachments"][0]["contentType"], "text/plain");

    // History keeps both, for the agent too.
    let history = room_messages(&s, &agent, "ann-room").await;
    assert_eq!(history.len(), 3);
    assert_eq!(history[1]["data"]["attachments"][0], described);
    assert_eq!(
        history[2]["data"]["attachments"][0]["fileId"],
        text_id.as_str()
    );

    // Members read the bytes as stored: the visitor, the agent, the agent by ?token=.
    let path = format!("/api/files/{id}");
    for (who, got) in [
        ("ann", fetch(&s, &path, Some(&ann)).await),
        ("agent", fetch(&s, &path, Some(&agent)).await),
        (
            "agent ?token",
            fetch(&s, &format!("{path}?token={agent}"), None).await,
        ),
    ] {
        let (status, headers, bytes) = got;
        assert_eq!(status, 200, "{who}");
        assert_eq!(bytes, PNG, "{who}");
        assert_eq!(header(&headers, "content-type"), "image/png");
        assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
        assert!(header(&headers, "content-security-policy").contains("sandbox"));
        assert!(header(&headers, "content-disposition").starts_with("inline;"));
    }
    // Text is a download, never a page.
    let (status, headers, bytes) = fetch(&s, &format!("/api/files/{text_id}"), Some(&ann)).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"notes: <b>not html</b>\n");
    assert_eq!(
        header(&headers, "content-type"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(
        header(&headers, "content-disposition"),
        "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt"
    );
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");

    // Anyone else: the file does not exist.
    for (who, token) in [
        ("another visitor", Some(bob.as_str())),
        ("another domain", Some(eve.as_str())),
        ("no token", None),
    ] {
        let (status, _, bytes) = fetch(&s, &path, token).await;
        assert_eq!(status, 404, "{who}");
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["code"], "file_not_found", "{who}");
    }
    let (status, _, _) = fetch(&s, &format!("{path}?token={bob}"), None).await;
    assert_eq!(status, 404);
    let (status, _, _) = fetch(&s, "/api/files/no-such-file", Some(&ann)).await;
    assert_eq!(status, 404);
    let (status, _, bytes) = fetch(&s, &path, Some("not-a-token")).await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["error"]["code"], "invalid_token");

    // The room's listing, for its members only.
    let (status, listed) = s.get_with("/api/rooms/ann-room/files", &ann).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["files"].as_array().unwrap().len(), 2);
    assert_eq!(s.get_with("/api/rooms/ann-room/files", &bob).await.0, 403);

    assert!(s.metric("parlor_files_uploaded_total", "").await >= 2.0);
    assert!(s.metric("parlor_files_served_total", "").await >= 4.0);
}

#[tokio::test]
async fn sizes_and_types_are_checked_and_a_refusal_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| {
        c.files.max_bytes = 8 * 1024;
        let shop = c.domains.iter_mut().find(|d| d.id == "shop").unwrap();
        shop.files.max_bytes = Some(1024);
    })
    .await;
    let ann = s.token_in("shop", "ann", "visitor");
    let eve = s.token_in("blog", "eve", "visitor");
    open_room(&s, &ann, "r1").await;
    open_room(&s, &eve, "r1").await;

    let big = vec![b'a'; 2000];
    let huge = vec![b'a'; 200 * 1024];
    let html = b"<!DOCTYPE html><html><script>alert(document.cookie)</script></html>";
    let cases: Vec<(&str, Vec<Part<'_>>, u16, &str)> = vec![
        (
            "over the domain's limit",
            vec![room_field("r1"), file_field("a.txt", "text/plain", &big)],
            413,
            "file_too_large",
        ),
        (
            "over the request's limit",
            vec![room_field("r1"), file_field("a.txt", "text/plain", &huge)],
            413,
            "file_too_large",
        ),
        (
            "a type not allowed",
            vec![
                room_field("r1"),
                file_field("a.bin", "application/octet-stream", b"\x00\x01\x02\x03"),
            ],
            400,
            "file_type_not_allowed",
        ),
        (
            "HTML claiming to be a PNG",
            vec![room_field("r1"), file_field("cat.png", "image/png", html)],
            400,
            "file_type_not_allowed",
        ),
        (
            "HTML as text",
            vec![room_field("r1"), file_field("page.txt", "text/plain", html)],
            400,
            "file_type_not_allowed",
        ),
        (
            "an empty file",
            vec![room_field("r1"), file_field("empty.txt", "text/plain", b"")],
            400,
            "invalid_upload",
        ),
    ];
    for (what, parts, status, code) in cases {
        let (got, body) = upload(&s, &ann, &parts).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {body}"
        );
    }
    assert!(stored_files(dir.path()).is_empty(), "nothing stored");
    let (_, listed) = s.get_with("/api/rooms/r1/files", &ann).await;
    assert_eq!(listed["files"], json!([]));

    // The other domain has the server's limit, 8 KiB.
    let (status, body) = upload(
        &s,
        &eve,
        &[room_field("r1"), file_field("a.txt", "text/plain", &big)],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(stored_files(dir.path()).len(), 1);
}

#[tokio::test]
async fn malformed_forms_get_clear_codes_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |_| {}).await;
    let ann = s.token_in("shop", "ann", "visitor");
    let bob = s.token_in("shop", "bob", "visitor");
    open_room(&s, &ann, "r1").await;
    let multipart = format!("multipart/form-data; boundary={BOUNDARY}");
    let whole = form(&[room_field("r1"), file_field("a.png", "image/png", PNG)]);
    let cut = whole[..whole.len() - 30].to_vec();

    let raw_cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "no boundary",
            "multipart/form-data",
            whole.clone(),
            400,
            "invalid_upload",
        ),
        (
            "not a form",
            "application/json",
            b"{}".to_vec(),
            400,
            "invalid_upload",
        ),
        ("a body cut short", &multipart, cut, 400, "invalid_upload"),
        (
            "garbage",
            &multipart,
            b"this is not multipart".to_vec(),
            400,
            "invalid_upload",
        ),
    ];
    for (what, content_type, body, status, code) in raw_cases {
        let (got, answer) = post_raw(&s, &ann, content_type, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {answer}"
        );
    }
    let form_cases: Vec<(&str, &str, Vec<Part<'_>>, u16, &str)> = vec![
        (
            "no file",
            "ann",
            vec![room_field("r1")],
            400,
            "invalid_upload",
        ),
        (
            "no room",
            "ann",
            vec![file_field("a.png", "image/png", PNG)],
            400,
            "invalid_upload",
        ),
        (
            "two files",
            "ann",
            vec![
                room_field("r1"),
                file_field("a.png", "image/png", PNG),
                file_field("b.png", "image/png", PNG),
            ],
            400,
            "invalid_upload",
        ),
        (
            "an unknown field",
            "ann",
            vec![
                room_field("r1"),
                Part {
                    name: "path",
                    file_name: None,
                    content_type: None,
                    bytes: b"../x",
                },
                file_field("a.png", "image/png", PNG),
            ],
            400,
            "invalid_upload",
        ),
        (
            "an unknown room",
            "ann",
            vec![room_field("nowhere"), file_field("a.png", "image/png", PNG)],
            404,
            "room_not_found",
        ),
        (
            "the file before the room",
            "ann",
            vec![file_field("a.png", "image/png", PNG), room_field("r1")],
            400,
            "invalid_upload",
        ),
        (
            "a malformed room id",
            "ann",
            vec![room_field("../r1"), file_field("a.png", "image/png", PNG)],
            400,
            "invalid_room_id",
        ),
        (
            "another visitor's room",
            "bob",
            vec![room_field("r1"), file_field("a.png", "image/png", PNG)],
            403,
            "forbidden",
        ),
    ];
    for (what, who, parts, status, code) in form_cases {
        let token = if who == "ann" { &ann } else { &bob };
        let (got, answer) = upload(&s, token, &parts).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{what}: {answer}"
        );
    }
    assert!(stored_files(dir.path()).is_empty(), "nothing stored");
    let (_, listed) = s.get_with("/api/rooms/r1/files", &ann).await;
    assert_eq!(listed["files"], json!([]));
    // The same form, whole, is taken.
    let (status, body) = post_raw(&s, &ann, &multipart, whole).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn attachments_must_be_files_of_the_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |c| c.files.max_per_message = 2).await;
    let ann = s.token_in("shop", "ann", "visitor");
    let eve = s.token_in("blog", "eve", "visitor");
    open_room(&s, &ann, "r1").await;
    open_room(&s, &ann, "r2").await;
    open_room(&s, &eve, "r1").await;
    let mut ids = Vec::new();
    for room in ["r1", "r1", "r1", "r2"] {
        let (status, body) = upload(
            &s,
            &ann,
            &[room_field(room), file_field("a.png", "image/png", PNG)],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["fileId"].as_str().unwrap().to_owned());
    }
    let (_, blog_file) = upload(
        &s,
        &eve,
        &[room_field("r1"), file_field("a.png", "image/png", PNG)],
    )
    .await;
    let blog_id = blog_file["fileId"].as_str().unwrap();

    let attach =
        |list: Vec<&str>| -> Value { list.into_iter().map(|id| json!({ "fileId": id })).collect() };
    let cases: Vec<(&str, Value)> = vec![
        (
            "an unknown file",
            attach(vec!["0199a8f2-0000-7000-8000-000000000000"]),
        ),
        ("another room's file", attach(vec![&ids[3]])),
        ("another domain's file", attach(vec![blog_id])),
        ("the same file twice", attach(vec![&ids[0], &ids[0]])),
        (
            "more than max_per_message",
            attach(vec![&ids[0], &ids[1], &ids[2]]),
        ),
        ("a malformed id", attach(vec!["../../x"])),
    ];
    for (what, attachments) in &cases {
        let (status, body) = s
            .post_with(
                "/api/messages",
                &ann,
                &json!({ "message": "see", "chatRoomId": "r1", "attachments": attachments }),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_attachments")),
            "{what}: {body}"
        );
    }
    // A client cannot write the attachments itself.
    let (status, body) = s
        .post_with(
            "/api/messages",
            &ann,
            &json!({ "message": "see", "chatRoomId": "r1", "data": { "attachments": [{ "fileId": ids[0], "url": "https://evil.example" }] } }),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_data")),
        "{body}"
    );
    // Over the socket too.
    let mut ws = common::Client::connect(&s.ws(&format!("/ws?token={ann}"))).await;
    ws.join("r1", None).await;
    for (what, attachments) in &cases {
        let req = ws
            .request(json!({ "type": "send-message", "roomId": "r1", "message": "see", "attachments": attachments }))
            .await;
        let answer = ws.reply(&req).await;
        assert_eq!(
            (answer["type"].as_str(), answer["code"].as_str()),
            (Some("error"), Some("invalid_attachments")),
            "{what}: {answer}"
        );
    }
    // Nothing was stored: the room holds its first message only.
    assert_eq!(room_messages(&s, &ann, "r1").await.len(), 1);
    // Two of the room's files are fine.
    let (status, body) = s
        .post_with(
            "/api/messages",
            &ann,
            &json!({ "message": "", "chatRoomId": "r1", "attachments": attach(vec![&ids[1], &ids[0]]) }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let order: Vec<&str> = body["data"]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["fileId"].as_str().unwrap())
        .collect();
    assert_eq!(order, [ids[1].as_str(), ids[0].as_str()]);
}

#[tokio::test]
async fn deleting_a_file_or_a_rooms_files_removes_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path(), |_| {}).await;
    let ann = s.token_in("shop", "ann", "visitor");
    let bob = s.token_in("shop", "bob", "visitor");
    let agent = s.token_in("shop", "agent-1", "agent");
    open_room(&s, &ann, "r1").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = upload(
            &s,
            &ann,
            &[room_field("r1"), file_field("a.png", "image/png", PNG)],
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["fileId"].as_str().unwrap().to_owned());
    }
    assert_eq!(stored_files(dir.path()).len(), 3);

    // Someone who cannot see it cannot delete it either.
    assert_eq!(
        s.delete_with(&format!("/api/files/{}", ids[0]), &bob)
            .await
            .0,
        404
    );
    // Its uploader can.
    let (status, body) = s.delete_with(&format!("/api/files/{}", ids[0]), &ann).await;
    assert_eq!(status, 200, "{body}");
    assert!(!dir.path().join("shop").join(&ids[0]).exists());
    assert_eq!(
        fetch(&s, &format!("/api/files/{}", ids[0]), Some(&ann))
            .await
            .0,
        404
    );
    assert_eq!(
        s.delete_with(&format!("/api/files/{}", ids[0]), &ann)
            .await
            .0,
        404
    );
    assert_eq!(stored_files(dir.path()).len(), 2);

    // A room's files: not by a visitor; by an agent, all of them.
    let (status, body) = s.delete_with("/api/rooms/r1/files", &ann).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    assert_eq!(stored_files(dir.path()).len(), 2);
    let (status, body) = s.delete_with("/api/rooms/r1/files", &agent).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 2);
    assert!(stored_files(dir.path()).is_empty());
    for id in &ids {
        assert_eq!(
            fetch(&s, &format!("/api/files/{id}"), Some(&agent)).await.0,
            404
        );
    }
    assert!(s.metric("parlor_files_deleted_total", "").await >= 3.0);
}

#[tokio::test]
async fn a_file_store_that_cannot_be_used_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    for (store, expected) in [
        ("ftp://files.example/x", "files.store"),
        ("s3://Not_A_Bucket", "files.store"),
    ] {
        let mut config = parlor::config::Config::default();
        config.files.store = store.to_owned();
        let e = config.validate().expect_err(store).to_string();
        assert!(e.contains(expected), "{store}: {e}");
    }
    // A path that is a file, not a folder: refused when the server starts.
    let not_a_folder = dir.path().join("plain-file");
    std::fs::write(&not_a_folder, b"x").unwrap();
    let mut config = parlor::config::Config {
        database: format!("sqlite://{}", dir.path().join("parlor.db").display()),
        ..parlor::config::Config::default()
    };
    config.files.store = not_a_folder.display().to_string();
    config.validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ran = tokio::time::timeout(
        common::WAIT,
        parlor::run(config, listener, tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("refused in time");
    let e = ran.expect_err("refused").to_string();
    assert!(e.contains("is not a folder"), "{e}");
}

/// The S3 server of `PARLOR_TEST_S3_URL`, if set.
fn s3_server() -> Option<String> {
    match std::env::var("PARLOR_TEST_S3_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_owned()),
        _ => {
            eprintln!(
                "skipped: set PARLOR_TEST_S3_URL (an S3-compatible server such as moto_server) to run the S3 test"
            );
            None
        }
    }
}

#[tokio::test]
async fn files_live_in_an_s3_bucket_when_configured() {
    let Some(url) = s3_server() else {
        return;
    };
    let bucket = format!("parlor-test-{}", uuid::Uuid::new_v4().simple());
    let http = reqwest::Client::new();
    let created = http
        .put(format!("{url}/{bucket}"))
        .send()
        .await
        .expect("create the bucket");
    assert!(
        created.status().is_success(),
        "bucket: {}",
        created.status()
    );
    let dir = tempfile::tempdir().unwrap();
    let endpoint = url.clone();
    let store = format!("s3://{bucket}/chat");
    let s = server(dir.path(), move |c| {
        c.files.store = store;
        c.files.s3_endpoint = Some(endpoint);
        c.files.s3_region = Some("us-east-1".into());
        c.files.s3_access_key_id = Some("parlor-test".into());
        c.files.s3_secret_access_key = Some(parlor::config::Secret::new("parlor-test-secret"));
        c.files.allow_http = true;
    })
    .await;
    let ann = s.token_in("shop", "ann", "visitor");
    let eve = s.token_in("blog", "eve", "visitor");
    open_room(&s, &ann, "r1").await;
    let (status, body) = upload(
        &s,
        &ann,
        &[room_field("r1"), file_field("pic.png", "image/png", PNG)],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["fileId"].as_str().unwrap().to_owned();
    assert!(
        stored_files(dir.path()).is_empty(),
        "nothing on the local disk"
    );
    // The object is in the bucket, under the prefix, the domain and the id.
    let bucket_client = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_endpoint(&url)
        .with_region("us-east-1")
        .with_access_key_id("parlor-test")
        .with_secret_access_key("parlor-test-secret")
        .with_allow_http(true)
        .build()
        .unwrap();
    let object = object_store::path::Path::from_iter(["chat", "shop", id.as_str()]);
    let found = bucket_client
        .get_opts(&object, object_store::GetOptions::default())
        .await
        .expect("the object is in the bucket");
    assert_eq!(found.bytes().await.unwrap().as_ref(), PNG);

    let (status, headers, bytes) = fetch(&s, &format!("/api/files/{id}"), Some(&ann)).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, PNG);
    assert_eq!(header(&headers, "content-type"), "image/png");
    assert_eq!(
        fetch(&s, &format!("/api/files/{id}"), Some(&eve)).await.0,
        404
    );

    let (status, body) = s.delete_with(&format!("/api/files/{id}"), &ann).await;
    assert_eq!(status, 200, "{body}");
    let gone = bucket_client
        .get_opts(&object, object_store::GetOptions::default())
        .await;
    assert!(
        matches!(gone, Err(object_store::Error::NotFound { .. })),
        "gone from the bucket"
    );
    assert_eq!(
        fetch(&s, &format!("/api/files/{id}"), Some(&ann)).await.0,
        404
    );
}
