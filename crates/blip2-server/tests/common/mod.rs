//! Shared by the server tests: servers on 127.0.0.1 with the fixture checkpoints, an HTTP
//! client that never uses a proxy, multipart forms and server-sent-event parsing.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use blip2_pipeline::{Blip2, LoadOptions};
use blip2_server::{Limits, Server, ServerConfig, ServerHandle};
use reqwest::multipart::{Form, Part};
use reqwest::{StatusCode, header};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const CAPTIONING: &str = "opt-tiny";
pub const T5: &str = "flan-t5-tiny";
pub const RETRIEVAL: &str = "itm-tiny";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model_dir(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

pub fn photo_path(name: &str) -> PathBuf {
    repo().join("images").join(name)
}

pub fn photo(name: &str) -> Vec<u8> {
    std::fs::read(photo_path(name)).expect("the repository's photos are readable")
}

pub fn load(model: &str) -> Arc<Blip2> {
    let blip2 = Blip2::from_dir(&model_dir(model), &LoadOptions::default())
        .expect("the fixture checkpoint loads");
    Arc::new(blip2)
}

/// A server running on 127.0.0.1 on a free port.
pub struct TestServer {
    pub base: String,
    pub handle: ServerHandle,
    pub blip2: Arc<Blip2>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), blip2_server::Error>>,
}

impl TestServer {
    pub async fn start(model: &str, limits: Limits) -> Self {
        Self::start_with(load(model), model, limits).await
    }

    pub async fn start_with(blip2: Arc<Blip2>, name: &str, limits: Limits) -> Self {
        let config = ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            limits,
            ..ServerConfig::new(name)
        };
        let server = Server::bind(Arc::clone(&blip2), config)
            .await
            .expect("the server binds 127.0.0.1:0");
        let base = format!("http://{}", server.local_addr());
        let handle = server.handle();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stop.await;
        }));
        Self {
            base,
            handle,
            blip2,
            shutdown: Some(shutdown),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Asks the server to shut down; `finished` waits for it.
    pub fn request_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Shuts the server down and waits until it has stopped.
    pub async fn stop(mut self) {
        self.request_shutdown();
        self.finished().await;
    }

    /// Waits until the server has stopped, and checks that it stopped cleanly.
    pub async fn finished(self) {
        let result = self.task.await.expect("the server task did not panic");
        assert!(result.is_ok(), "the server stopped with {result:?}");
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        // Tests talk only to the servers they start on 127.0.0.1.
        .no_proxy()
        .build()
        .unwrap()
}

fn image_mime(name: &str) -> &'static str {
    if name.ends_with(".jpg") {
        "image/jpeg"
    } else {
        "image/png"
    }
}

pub fn image_part(bytes: Vec<u8>, name: &str) -> Part {
    Part::bytes(bytes)
        .file_name(name.to_owned())
        .mime_str(image_mime(name))
        .unwrap()
}

/// Builds a form whose `image` is sent in 32 KiB chunks, so the request has no `Content-Length`.
pub fn chunked_image_form(bytes: Vec<u8>, name: &str) -> Form {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes
        .chunks(32 * 1024)
        .map(|chunk| Ok(chunk.to_vec()))
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let part = Part::stream(body)
        .file_name(name.to_owned())
        .mime_str(image_mime(name))
        .unwrap();
    Form::new().part("image", part)
}

/// A form with the photo `name` from `images/` as its `image`.
pub fn photo_form(name: &str) -> Form {
    Form::new().part("image", image_part(photo(name), name))
}

/// Posts `form` to `path` and returns the status and the JSON body.
pub async fn post_json(server: &TestServer, path: &str, form: Form) -> (StatusCode, Value) {
    post_url(server.url(path), form).await
}

/// Posts `form` to `url` and returns the status and the JSON body; owns its arguments,
/// so it can run in a spawned task.
pub async fn post_url(url: String, form: Form) -> (StatusCode, Value) {
    let response = client()
        .post(url)
        .multipart(form)
        .send()
        .await
        .expect("the server answers");
    json_of(response).await
}

pub async fn json_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = response.text().await.expect("the body is readable");
    assert!(
        content_type.starts_with("application/json"),
        "expected a JSON answer, got {content_type:?}: {text}"
    );
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("invalid JSON {text}: {e}"));
    (status, body)
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub name: String,
    pub data: Value,
}

/// Posts `form` with `Accept: text/event-stream`.
pub async fn post_stream(server: &TestServer, path: &str, form: Form) -> reqwest::Response {
    client()
        .post(server.url(path))
        .header(header::ACCEPT, "text/event-stream")
        .multipart(form)
        .send()
        .await
        .expect("the server answers")
}

/// Reads a whole event stream.
pub async fn read_events(response: reqwest::Response) -> Vec<SseEvent> {
    let content_type = response.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "expected an event stream, got {content_type}"
    );
    let text = response.text().await.expect("the stream is readable");
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = "message".to_owned();
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    name = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
                }
            }
            (!data.is_empty()).then(|| SseEvent {
                name,
                data: serde_json::from_str(&data.join("\n"))
                    .unwrap_or_else(|e| panic!("invalid event data in {block:?}: {e}")),
            })
        })
        .collect()
}

/// Checks that `body` is an error with `code`, and returns its message.
pub fn error_message(body: &Value, code: &str) -> String {
    assert_eq!(body["error"]["code"], code, "unexpected body {body}");
    body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"))
        .to_owned()
}
