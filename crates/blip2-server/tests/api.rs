//! The HTTP API against servers on 127.0.0.1 with the fixture checkpoints: every endpoint
//! in JSON and event-stream modes, results equal to the library's, conversations kept by
//! session id, and checkpoints of the wrong kind. The checkpoints have random weights, so
//! the texts are noise; what is checked is that the server returns what the library does.

mod common;

use blip2_pipeline::{Blip2, Conversation};
use blip2_server::Limits;
use common::*;
use reqwest::multipart::Form;
use reqwest::{StatusCode, header};
use serde_json::Value;

fn decode(name: &str) -> blip2_image::RgbImage {
    blip2_image::decode_image(&photo(name), &Default::default()).unwrap()
}

fn library_caption(blip2: &Blip2, name: &str) -> String {
    let options = blip2.default_generation_options();
    blip2.caption(&decode(name), None, &options).unwrap().text
}

fn library_answer(blip2: &Blip2, name: &str, question: &str, max_new_tokens: usize) -> String {
    let options = blip2_pipeline::GenerationOptions {
        max_new_tokens,
        ..blip2.default_generation_options()
    };
    let mut conversation = Conversation::new(blip2, &decode(name)).unwrap();
    conversation.ask(question, &options, None).unwrap().text
}

fn texts_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|event| event.name == "text")
        .map(|event| event.data["text"].as_str().unwrap())
        .collect()
}

fn unit_rows(rows: &Value, count: usize, width: usize) -> Vec<Vec<f32>> {
    let rows: Vec<Vec<f32>> = serde_json::from_value(rows.clone()).unwrap();
    assert_eq!(rows.len(), count, "row count");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), width, "width of row {i}");
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "row {i} has norm {norm}");
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_model_queue_and_limits() {
    let limits = Limits {
        queue_size: 3,
        max_text_chars: 77,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    let response = client()
        .get(server.url("/api/health"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["model"]["kind"], "captioning");
    assert_eq!(body["model"]["language_model"], "opt");
    assert_eq!(body["model"]["dtype"], "f32");
    assert_eq!(body["queue"]["waiting"], 0);
    assert_eq!(body["queue"]["busy"], false);
    assert_eq!(body["queue"]["capacity"], 3);
    assert_eq!(body["limits"]["max_text_chars"], 77);
    assert_eq!(body["limits"]["max_upload_bytes"], 20_971_520);
    assert_eq!(body["defaults"]["max_new_tokens"], 30);
    assert_eq!(body["defaults"]["decoding"], "beam");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caption_json_equals_library_caption() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let (status, body) = post_json(&server, "/api/caption", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["caption"],
        library_caption(&server.blip2, "rocket.jpg")
    );
    assert!(
        body["token_ids"]
            .as_array()
            .is_some_and(|ids| !ids.is_empty()),
        "{body}"
    );
    assert_eq!(body["settings"]["decoding"], "beam");
    assert_eq!(body["settings"]["num_beams"], 1);
    assert!(body["timings"]["compute_ms"].is_u64(), "{body}");
    assert!(
        body.get("session").is_none(),
        "a session was kept unasked: {body}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caption_stream_pieces_join_to_result() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let response = post_stream(&server, "/api/caption", photo_form("chelsea.png")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let events = read_events(response).await;
    let last = events.last().expect("at least one event");
    assert_eq!(last.name, "done", "{events:?}");
    assert!(
        events.iter().filter(|event| event.name == "text").count() >= 1,
        "no text events in {events:?}"
    );
    assert_eq!(texts_of(&events), last.data["caption"].as_str().unwrap());
    assert_eq!(
        last.data["caption"],
        library_caption(&server.blip2, "chelsea.png")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caption_applies_decoding_settings() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;

    let beams = photo_form("coffee.png")
        .text("decoding", "beam")
        .text("num_beams", "3")
        .text("max_new_tokens", "5")
        .text("length_penalty", "0.5")
        .text("repetition_penalty", "1.3");
    let (status, body) = post_json(&server, "/api/caption", beams).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["score"].is_f64(), "beam search gave no score: {body}");
    assert!(body["token_ids"].as_array().unwrap().len() <= 5, "{body}");
    assert_eq!(body["settings"]["num_beams"], 3);
    assert_eq!(body["settings"]["length_penalty"], 0.5);

    let sampled = || {
        photo_form("coffee.png")
            .text("decoding", "nucleus")
            .text("top_p", "0.9")
            .text("temperature", "0.8")
            .text("seed", "1234")
    };
    let (_, first) = post_json(&server, "/api/caption", sampled()).await;
    let (_, second) = post_json(&server, "/api/caption", sampled()).await;
    assert_eq!(first["settings"]["decoding"], "nucleus");
    assert_eq!(first["settings"]["seed"], 1234);
    assert_eq!(
        first["token_ids"], second["token_ids"],
        "a seed did not repeat"
    );

    let (_, unseeded) = post_json(
        &server,
        "/api/caption",
        photo_form("coffee.png").text("decoding", "nucleus"),
    )
    .await;
    assert!(
        unseeded["settings"]["seed"].is_u64(),
        "no drawn seed: {unseeded}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_follow_up_reuses_encoded_image() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    // Few new tokens, so that both turns fit the fixture's 64 positions.
    let first_question = "what is in the picture?";
    let form = photo_form("chelsea.png")
        .text("question", first_question)
        .text("max_new_tokens", "4");
    let (status, first) = post_json(&server, "/api/ask", form).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        first["answer"],
        library_answer(&server.blip2, "chelsea.png", first_question, 4)
    );
    assert_eq!(first["turns"], 1);
    let session = first["session"].as_str().unwrap().to_owned();
    assert_eq!(session.len(), 32, "{session}");

    let encoded = server.blip2.model().images_encoded();
    let follow_up = Form::new()
        .text("session", session.clone())
        .text("question", "and what color is it?")
        .text("max_new_tokens", "4");
    let response = post_stream(&server, "/api/ask", follow_up).await;
    let events = read_events(response).await;
    let done = events.last().unwrap();
    assert_eq!(done.name, "done", "{events:?}");
    assert_eq!(texts_of(&events), done.data["answer"].as_str().unwrap());
    assert_eq!(done.data["session"], session.as_str());
    assert_eq!(done.data["turns"], 2, "{:?}", done.data);
    assert_eq!(done.data["dropped_turns"], 0);
    let prompt = done.data["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with(&format!("Question: {first_question} Answer:")),
        "the first turn is not in the prompt {prompt:?}"
    );
    assert!(
        prompt.ends_with("Question: and what color is it? Answer:"),
        "{prompt:?}"
    );
    assert_eq!(
        server.blip2.model().images_encoded(),
        encoded,
        "the follow-up encoded the image again"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caption_session_carries_into_chat() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let form = photo_form("rocket.jpg").text("start_session", "true");
    let (status, caption) = post_json(&server, "/api/caption", form).await;
    assert_eq!(status, StatusCode::OK, "{caption}");
    let session = caption["session"]
        .as_str()
        .expect("a session id")
        .to_owned();

    let encoded = server.blip2.model().images_encoded();
    let question = "is it day or night?";
    let form = Form::new()
        .text("session", session)
        .text("question", question);
    let (status, answer) = post_json(&server, "/api/ask", form).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["turns"], 1);
    assert_eq!(
        server.blip2.model().images_encoded(),
        encoded,
        "the question encoded the image again"
    );
    assert_eq!(
        answer["answer"],
        library_answer(&server.blip2, "rocket.jpg", question, 30)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_rejects_bad_session_requests() {
    let limits = Limits {
        max_sessions: 2,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;

    let unknown = Form::new()
        .text("session", "0123456789abcdef0123456789abcdef")
        .text("question", "hello?");
    let (status, body) = post_json(&server, "/api/ask", unknown).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = error_message(&body, "session_not_found");
    assert!(message.contains("send the image again"), "{message}");

    let both = photo_form("rocket.jpg")
        .text("session", "0123")
        .text("question", "hello?");
    let (status, body) = post_json(&server, "/api/ask", both).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("not both"));

    let neither = Form::new().text("question", "hello?");
    let (status, body) = post_json(&server, "/api/ask", neither).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("`session`"));

    let no_question = photo_form("rocket.jpg").text("question", "   ");
    let (status, body) = post_json(&server, "/api/ask", no_question).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("`question`"));

    let template = photo_form("rocket.jpg")
        .text("question", "hello?")
        .text("template", "no placeholder");
    let (status, body) = post_json(&server, "/api/ask", template).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("{}"));

    // With room for two sessions, a third evicts the least recently used.
    let mut sessions = Vec::new();
    for _ in 0..3 {
        let form = photo_form("rocket.jpg").text("question", "what?");
        let (status, body) = post_json(&server, "/api/ask", form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sessions.push(body["session"].as_str().unwrap().to_owned());
    }
    let evicted = Form::new()
        .text("session", sessions[0].clone())
        .text("question", "still there?");
    let (status, _) = post_json(&server, "/api/ask", evicted).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the oldest session was kept");
    let kept = Form::new()
        .text("session", sessions[2].clone())
        .text("question", "still there?");
    let (status, body) = post_json(&server, "/api/ask", kept).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_checkpoint_captions_and_answers() {
    let server = TestServer::start(T5, Limits::default()).await;
    let (status, caption) = post_json(&server, "/api/caption", photo_form("coffee.png")).await;
    assert_eq!(status, StatusCode::OK, "{caption}");
    assert_eq!(
        caption["caption"],
        library_caption(&server.blip2, "coffee.png")
    );
    let form = photo_form("coffee.png").text("question", "what is this?");
    let (status, answer) = post_json(&server, "/api/ask", form).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["answer"],
        library_answer(&server.blip2, "coffee.png", "what is this?", 30)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_retrieval_gives_image_and_text_embeds() {
    let server = TestServer::start(RETRIEVAL, Limits::default()).await;
    let form = photo_form("chelsea.png")
        .text("text", "a cat")
        .text("text", "a rocket");
    let (status, body) = post_json(&server, "/api/embed", form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model_kind"], "retrieval");
    let image_embeds = unit_rows(&body["image_embeds"], 6, 16);
    let text_embeds = unit_rows(&body["text_embeds"], 2, 16);
    let features: Vec<Vec<f32>> =
        serde_json::from_value(body["qformer_last_hidden_state"].clone()).unwrap();
    assert_eq!((features.len(), features[0].len()), (6, 32));
    assert_eq!(body["texts"], serde_json::json!(["a cat", "a rocket"]));

    let blip2 = &server.blip2;
    let pixels = blip2.pixel_values(&[decode("chelsea.png")]).unwrap();
    let expected_image = blip2
        .image_embeds(&blip2.encode_images(&pixels).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(image_embeds, expected_image);
    let expected_text = blip2
        .text_embeds(&["a cat", "a rocket"])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(text_embeds, expected_text);

    let texts_only = Form::new().text("text", "a dog");
    let (status, body) = post_json(&server, "/api/embed", texts_only).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("image_embeds").is_none(), "{body}");
    unit_rows(&body["text_embeds"], 1, 16);

    let (status, body) = post_json(&server, "/api/embed", Form::new()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error_message(&body, "invalid_request");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_captioning_gives_qformer_features_only() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let (status, body) = post_json(&server, "/api/embed", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model_kind"], "captioning");
    let features: Vec<Vec<f32>> =
        serde_json::from_value(body["qformer_last_hidden_state"].clone()).unwrap();
    assert_eq!((features.len(), features[0].len()), (8, 32));
    assert!(body.get("image_embeds").is_none(), "{body}");

    let with_text = photo_form("rocket.jpg").text("text", "a rocket");
    let (status, body) = post_json(&server, "/api/embed", with_text).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error_message(&body, "wrong_model_kind");
    assert!(
        message.contains("image-text retrieval checkpoint"),
        "{message}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_scores_each_text_like_library() {
    let server = TestServer::start(RETRIEVAL, Limits::default()).await;
    let texts = ["a cat on a blanket", "a rocket", "a cup of coffee"];
    let mut form = photo_form("chelsea.png");
    for text in texts {
        form = form.text("text", text);
    }
    let (status, body) = post_json(&server, "/api/match", form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let scores = body["scores"].as_array().unwrap();
    assert_eq!(scores.len(), texts.len());
    let expected = server
        .blip2
        .match_texts(&decode("chelsea.png"), &texts)
        .unwrap();
    for (score, expected) in scores.iter().zip(&expected) {
        assert_eq!(score["text"], expected.text.as_str());
        let probability = score["itm_probability"].as_f64().unwrap() as f32;
        let similarity = score["itc_similarity"].as_f64().unwrap() as f32;
        assert_eq!(probability, expected.itm_probability, "{}", expected.text);
        assert_eq!(similarity, expected.itc_similarity, "{}", expected.text);
        assert!((0.0..=1.0).contains(&probability), "{probability}");
    }

    let no_texts = photo_form("chelsea.png");
    let (status, body) = post_json(&server, "/api/match", no_texts).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("`text`"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_checkpoint_kind_names_needed_kind() {
    let retrieval = TestServer::start(RETRIEVAL, Limits::default()).await;
    let (status, body) = post_json(&retrieval, "/api/caption", photo_form("rocket.jpg")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error_message(&body, "wrong_model_kind");
    assert!(
        message.contains("needs a captioning checkpoint"),
        "{message}"
    );
    let form = photo_form("rocket.jpg").text("question", "what?");
    let response = post_stream(&retrieval, "/api/ask", form).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (_, body) = json_of(response).await;
    error_message(&body, "wrong_model_kind");
    retrieval.stop().await;

    let captioning = TestServer::start(CAPTIONING, Limits::default()).await;
    let form = photo_form("rocket.jpg").text("text", "a rocket");
    let (status, body) = post_json(&captioning, "/api/match", form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error_message(&body, "wrong_model_kind");
    assert!(
        message.contains("needs an image-text retrieval checkpoint"),
        "{message}"
    );
    let form = Form::new().text("text", "a rocket");
    let (status, body) = post_json(&captioning, "/api/embed", form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error_message(&body, "wrong_model_kind");
    assert!(
        message.starts_with(
            "/api/embed with `text` fields (text embeddings) needs an image-text retrieval \
             checkpoint"
        ),
        "{message}"
    );
    captioning.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let client = client();

    let response = client
        .post(server.url("/api/caption"))
        .header(header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (_, body) = json_of(response).await;
    assert!(error_message(&body, "unsupported_media_type").contains("multipart/form-data"));

    let unknown = photo_form("rocket.jpg").text("beams", "3");
    let (status, body) = post_json(&server, "/api/caption", unknown).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("unknown form field `beams`"));

    let not_a_number = photo_form("rocket.jpg").text("num_beams", "many");
    let (status, body) = post_json(&server, "/api/caption", not_a_number).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("`num_beams`"));

    let mixed = photo_form("rocket.jpg").text("temperature", "0.5");
    let (status, body) = post_json(&server, "/api/caption", mixed).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("decoding=nucleus"));

    let no_image = Form::new().text("prompt", "a photo of");
    let (status, body) = post_json(&server, "/api/caption", no_image).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_message(&body, "invalid_request").contains("`image`"));

    let response = client
        .get(server.url("/api/captions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let (_, body) = json_of(response).await;
    assert!(error_message(&body, "not_found").contains("/api/captions"));

    let response = client.get(server.url("/api/caption")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let (_, body) = json_of(response).await;
    error_message(&body, "method_not_allowed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_multipart_bodies_get_json_415() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let client = client();
    let cases = [
        ("/api/caption", "`image` file field"),
        ("/api/ask", "`question` field"),
        ("/api/embed", "`text` fields"),
        ("/api/match", "`text` fields"),
    ];
    for (path, fields) in cases {
        let response = client
            .post(server.url(path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(r#"{"image": "cat.jpg"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{path}"
        );
        let (_, body) = json_of(response).await;
        let message = error_message(&body, "unsupported_media_type");
        assert!(message.starts_with(path), "{path}: {message}");
        assert!(message.contains("multipart/form-data"), "{path}: {message}");
        assert!(message.contains(fields), "{path}: {message}");
        assert!(
            message.contains("this request is application/json"),
            "{path}: {message}"
        );
    }

    let response = client
        .post(server.url("/api/caption"))
        .body("photo bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (_, body) = json_of(response).await;
    let message = error_message(&body, "unsupported_media_type");
    assert!(message.contains("has no Content-Type"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_api_paths_get_json_404() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let client = client();
    for path in ["/api", "/api/", "/api//caption", "/api/caption/extra"] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let response = client
                .request(method.clone(), server.url(path))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{method} {path}");
            let (_, body) = json_of(response).await;
            let message = error_message(&body, "not_found");
            assert!(message.contains(path), "{method} {path}: {message}");
        }
    }

    // Outside /api the page's plain-text 404 stays.
    let response = client.get(server.url("/apix")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().await.unwrap(), "not found\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_text_fields_are_rejected() {
    let server = TestServer::start(RETRIEVAL, Limits::default()).await;
    for path in ["/api/match", "/api/embed"] {
        let form = photo_form("rocket.jpg")
            .text("text", "a rocket")
            .text("text", " \t ");
        let (status, body) = post_json(&server, path, form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        let message = error_message(&body, "invalid_request");
        assert!(
            message.contains("`text` field 2 is empty"),
            "{path}: {message}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_and_examples_are_embedded() {
    let server = TestServer::start(CAPTIONING, Limits::default()).await;
    let client = client();

    let page = client.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert_eq!(page.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let html = page.text().await.unwrap();
    assert!(html.contains("Caption it"), "{html}");

    for (path, content_type) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let actual = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(actual.starts_with(content_type), "{path}: {actual}");
    }

    for name in ["cat.jpg", "coffee.jpg", "rocket.jpg"] {
        let response = client
            .get(server.url(&format!("/examples/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}");
        let bytes = response.bytes().await.unwrap();
        let image = blip2_image::decode_image(&bytes, &Default::default())
            .unwrap_or_else(|e| panic!("{name} does not decode: {e}"));
        assert!(
            image.width() <= 384 && image.height() <= 384,
            "{name} is large"
        );
    }

    for path in [
        "/examples/../Cargo.toml",
        "/examples/%2e%2e%2fCargo.toml",
        "/examples/x.jpg",
        "/Cargo.toml",
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    server.stop().await;
}
