//! Limits, bad images, the queue and shutdown, against servers on 127.0.0.1 with the
//! fixture checkpoints. A busy worker is made with `ServerHandle::pause_worker`, and the
//! tests wait on the queue's status changes rather than on time.

mod common;

use std::time::Duration;

use blip2_server::{Limits, QueueStatus};
use common::*;
use reqwest::multipart::Form;
use reqwest::{StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Upper bound on any wait in these tests, so that a bug fails a test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

async fn wait_for_queue(
    status: &mut watch::Receiver<QueueStatus>,
    condition: impl FnMut(&QueueStatus) -> bool,
) {
    tokio::time::timeout(PATIENCE, status.wait_for(condition))
        .await
        .expect("the queue reached the expected state in time")
        .expect("the server is running");
}

fn assert_limit(body: &Value, code: &str, limit: &str, value: Value) -> String {
    let message = error_message(body, code);
    assert_eq!(body["error"]["limit"], limit, "{body}");
    assert_eq!(body["error"]["value"], value, "{body}");
    message
}

fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get(header::RETRY_AFTER)
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

fn expected_caption(server: &TestServer, name: &str) -> String {
    let image = blip2_image::decode_image(&photo(name), &Default::default()).unwrap();
    let options = server.blip2.default_generation_options();
    server.blip2.caption(&image, None, &options).unwrap().text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_get_clear_errors() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let png = photo("chelsea.png");
    let jpeg = photo("rocket.jpg");
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("empty.png", Vec::new(), "the image is empty"),
        (
            "notes.png",
            b"just some text".to_vec(),
            "not a supported image",
        ),
        ("cut.png", png[..png.len() / 3].to_vec(), "invalid PNG data"),
        (
            "cut.jpg",
            jpeg[..jpeg.len() / 2].to_vec(),
            "invalid JPEG data",
        ),
    ];
    for (name, bytes, expected) in cases {
        let form = Form::new().part("image", image_part(bytes, name));
        let (status, body) = post_json(&server, "/api/caption", form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        let message = error_message(&body, "invalid_image");
        assert!(message.starts_with(name), "{name}: {message}");
        assert!(message.contains(expected), "{name}: {message}");
    }

    // The same error keeps its status when events were asked for: no text came first.
    let form = Form::new().part("image", image_part(b"GIF89a".to_vec(), "tiny.gif"));
    let response = post_stream(&server, "/api/caption", form).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (_, body) = json_of(response).await;
    error_message(&body, "invalid_image");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_pixels_is_413() {
    let limits = Limits {
        max_image_pixels: 200_000,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    // rocket.jpg is 640x427 = 273,280 pixels.
    for path in ["/api/caption", "/api/embed"] {
        let (status, body) = post_json(&server, path, photo_form("rocket.jpg")).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
        let message = assert_limit(&body, "too_many_pixels", "max_image_pixels", json!(200_000));
        assert!(message.contains("640x427"), "{message}");
    }
    // chelsea.png is 451x300 = 135,300 pixels.
    let (status, body) = post_json(&server, "/api/caption", photo_form("chelsea.png")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_over_limit_is_413() {
    let limits = Limits {
        max_upload_bytes: 300_000,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;

    // With a Content-Length (791 KB), rejected before the form is read.
    let (status, body) = post_json(&server, "/api/caption", photo_form("astronaut.png")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let message = assert_limit(
        &body,
        "upload_too_large",
        "max_upload_bytes",
        json!(300_000),
    );
    assert!(message.contains("300000 bytes"), "{message}");

    // A body far over the limit with a Content-Length, then two without one (chunked): a photo
    // a little over the limit and a body far over it. The server drains the rest of each body
    // before it responds, so a client still sending gets the response, not a reset.
    let large = || vec![0xAB; 8 * 1024 * 1024];
    let over_limit = [
        (
            "/api/caption",
            Form::new().part("image", image_part(large(), "large.png")),
        ),
        (
            "/api/ask",
            chunked_image_form(photo("astronaut.png"), "astronaut.png"),
        ),
        ("/api/ask", chunked_image_form(large(), "large.png")),
    ];
    for (path, form) in over_limit {
        let (status, body) = post_json(&server, path, form).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
        assert_limit(
            &body,
            "upload_too_large",
            "max_upload_bytes",
            json!(300_000),
        );
    }

    // A chunked photo under the limit goes through.
    let form = chunked_image_form(photo("rocket.jpg"), "rocket.jpg");
    let (status, body) = post_json(&server, "/api/caption", form).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // A photo under the limit goes through.
    let (status, body) = post_json(&server, "/api/caption", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

/// Sends the head of a request that declares `length` body bytes, then `body`, and returns
/// everything the server sends before it closes the connection or `PATIENCE` runs out.
fn send_partial_request(address: &str, length: u64, body: &[u8]) -> String {
    use std::io::{Read, Write};

    let mut stream = std::net::TcpStream::connect(address).expect("the server accepts");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let head = format!(
        "POST /api/caption HTTP/1.1\r\nHost: {address}\r\n\
         Content-Type: multipart/form-data; boundary=limit-test\r\n\
         Content-Length: {length}\r\n\r\n"
    );
    // One write, so the server reads the whole of it: closing a socket with unread data
    // would reset the connection, and the response could be lost.
    stream.write_all(&[head.as_bytes(), body].concat()).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_declared_length_gets_413_at_once() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let address = server.base.trim_start_matches("http://").to_owned();

    // The body never arrives, so the server must respond without waiting for it.
    let started = std::time::Instant::now();
    let response = tokio::task::spawn_blocking(move || {
        send_partial_request(&address, 999_999_999, b"--limit-test\r\n")
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() < PATIENCE,
        "no answer within {PATIENCE:?}: {response:?}"
    );
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_limit(
        &body,
        "upload_too_large",
        "max_upload_bytes",
        json!(blip2_server::DEFAULT_MAX_UPLOAD_BYTES),
    );

    // The server still serves other requests.
    let (status, body) = post_json(&server, "/api/caption", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_decoding_limits_name_the_limit() {
    let limits = Limits {
        max_text_chars: 10,
        max_new_tokens_limit: 8,
        max_num_beams: 2,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;

    let long = photo_form("rocket.jpg").text("question", "what is it, really?");
    let (status, body) = post_json(&server, "/api/ask", long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = assert_limit(&body, "text_too_long", "max_text_chars", json!(10));
    assert!(
        message.contains("`question` field has 19 characters"),
        "{message}"
    );

    let prompt = photo_form("rocket.jpg").text("prompt", "a photograph of");
    let (status, body) = post_json(&server, "/api/caption", prompt).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_limit(&body, "text_too_long", "max_text_chars", json!(10));

    let tokens = photo_form("rocket.jpg").text("max_new_tokens", "9");
    let (status, body) = post_json(&server, "/api/caption", tokens).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_limit(
        &body,
        "too_many_new_tokens",
        "max_new_tokens_limit",
        json!(8),
    );

    let beams = photo_form("rocket.jpg").text("num_beams", "3");
    let (status, body) = post_json(&server, "/api/caption", beams).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_limit(&body, "too_many_beams", "max_num_beams", json!(2));

    // The checkpoint's default of 30 new tokens is lowered to the ceiling.
    let (status, body) = post_json(&server, "/api/caption", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["settings"]["max_new_tokens"], 8);
    assert!(body["token_ids"].as_array().unwrap().len() <= 8, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_count_limit_names_the_limit() {
    let limits = Limits {
        max_texts: 2,
        max_text_chars: 20,
        ..Limits::default()
    };
    let server = TestServer::start(RETRIEVAL, limits).await;
    let three = photo_form("rocket.jpg")
        .text("text", "a")
        .text("text", "b")
        .text("text", "c");
    let (status, body) = post_json(&server, "/api/match", three).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_limit(&body, "too_many_texts", "max_texts", json!(2));

    let long = Form::new().text("text", "a very long description of a rocket");
    let (status, body) = post_json(&server, "/api/embed", long).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_limit(&body, "text_too_long", "max_text_chars", json!(20));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_gives_503_with_retry_after() {
    let limits = Limits {
        queue_size: 2,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    let mut status = server.handle.watch_queue();
    let url = server.url("/api/caption");

    let pause = server.handle.pause_worker();
    let running = tokio::spawn(post_url(url.clone(), photo_form("rocket.jpg")));
    wait_for_queue(&mut status, |s| s.busy && s.waiting == 0).await;
    let waiting: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post_url(url.clone(), photo_form("rocket.jpg"))))
        .collect();
    wait_for_queue(&mut status, |s| s.waiting == 2).await;

    let response = client()
        .post(url.clone())
        .header(header::ACCEPT, "text/event-stream")
        .multipart(photo_form("rocket.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after(&response) >= 1);
    let (_, body) = json_of(response).await;
    let message = assert_limit(&body, "queue_full", "queue_size", json!(2));
    assert!(message.contains("Retry-After"), "{message}");

    let health = client()
        .get(server.url("/api/health"))
        .send()
        .await
        .unwrap();
    let (_, health) = json_of(health).await;
    assert_eq!(health["queue"]["waiting"], 2, "{health}");
    assert_eq!(health["queue"]["busy"], true, "{health}");

    drop(pause);
    let expected = expected_caption(&server, "rocket.jpg");
    for task in std::iter::once(running).chain(waiting) {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["caption"], expected.as_str());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_past_timeout_is_not_started() {
    let limits = Limits {
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    let url = server.url("/api/caption");
    let encoded = server.blip2.model().images_encoded();

    let pause = server.handle.pause_worker();
    // The first is taken by the paused worker, the second waits in the queue; both time out.
    let held = tokio::spawn(post_url(url.clone(), photo_form("rocket.jpg")));
    let streamed = client()
        .post(url.clone())
        .header(header::ACCEPT, "text/event-stream")
        .multipart(photo_form("rocket.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(retry_after(&streamed) >= 1);
    let (_, body) = json_of(streamed).await;
    let message = assert_limit(&body, "request_timeout", "request_timeout_secs", json!(0.3));
    assert!(message.contains("was not started"), "{message}");
    let (status, body) = held.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    error_message(&body, "request_timeout");

    drop(pause);
    let (status, body) = post_url(url, photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        server.blip2.model().images_encoded(),
        encoded + 1,
        "a job that timed out was run"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_all_answered() {
    let limits = Limits {
        queue_size: 64,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    let photos = ["rocket.jpg", "chelsea.png", "coffee.png"];
    let expected: Vec<String> = photos
        .iter()
        .map(|name| expected_caption(&server, name))
        .collect();
    let encoded = server.blip2.model().images_encoded();

    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let url = server.url("/api/caption");
            let name = photos[i % photos.len()];
            tokio::spawn(async move {
                let form = photo_form(name);
                if i % 2 == 0 {
                    let (status, body) = post_url(url, form).await;
                    assert_eq!(status, StatusCode::OK, "request {i}: {body}");
                    body["caption"].as_str().unwrap().to_owned()
                } else {
                    let response = client()
                        .post(url)
                        .header(header::ACCEPT, "text/event-stream")
                        .multipart(form)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK, "request {i}");
                    let events = read_events(response).await;
                    let done = events.last().unwrap();
                    assert_eq!(done.name, "done", "request {i}: {events:?}");
                    let streamed: String = events
                        .iter()
                        .filter(|event| event.name == "text")
                        .map(|event| event.data["text"].as_str().unwrap())
                        .collect();
                    let caption = done.data["caption"].as_str().unwrap().to_owned();
                    assert_eq!(streamed, caption, "request {i}");
                    caption
                }
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let caption = task.await.expect("the request task did not panic");
        assert_eq!(
            caption,
            expected[i % photos.len()],
            "request {i} got another caption"
        );
    }

    let mut status = server.handle.watch_queue();
    wait_for_queue(&mut status, |s| !s.busy && s.waiting == 0).await;
    assert_eq!(server.blip2.model().images_encoded(), encoded + 50);
    let health = client()
        .get(server.url("/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let mut server = TestServer::start(CAPTIONING, Limits::default()).await;
    let mut status = server.handle.watch_queue();
    let url = server.url("/api/caption");
    let expected = expected_caption(&server, "rocket.jpg");

    let pause = server.handle.pause_worker();
    let in_flight = tokio::spawn(post_url(url.clone(), photo_form("rocket.jpg")));
    wait_for_queue(&mut status, |s| s.busy).await;
    server.request_shutdown();
    drop(pause);

    let (code, body) = in_flight.await.unwrap();
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["caption"], expected.as_str());
    server.finished().await;
    let after = client()
        .post(url)
        .multipart(photo_form("rocket.jpg"))
        .send()
        .await;
    assert!(after.is_err(), "a stopped server answered: {after:?}");
}
