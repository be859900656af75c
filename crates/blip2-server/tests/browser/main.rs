//! The demo page in a real headless Chromium, driven through chromedriver's WebDriver API
//! on 127.0.0.1: choose a photo, caption it, chat about it, and see errors in words.
//!
//! Needs Debian's `chromium` and `chromium-driver` packages. Without them the test prints a
//! note and passes, unless `BLIP2_REQUIRE_BROWSER=1`, which makes it fail. On failure it
//! saves a screenshot under the target directory and prints its path.

#[path = "../common/mod.rs"]
mod common;
mod webdriver;

use std::path::{Path, PathBuf};
use std::time::Duration;

use blip2_pipeline::Conversation;
use blip2_server::Limits;
use common::*;
use serde_json::json;
use webdriver::{Driver, Result, Session};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The page's upload limit in this test: above rocket.jpg (112 KB), below astronaut.png (791 KB).
const MAX_UPLOAD_BYTES: usize = 300_000;

/// What the page should show, computed with the library.
struct Expected {
    caption: String,
    answer: String,
}

const QUESTION: &str = "what is in the photo?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_captions_chats_and_reports_errors() {
    let (chromium, chromedriver) = (Path::new(CHROMIUM), Path::new(CHROMEDRIVER));
    if !chromium.exists() || !chromedriver.exists() {
        let note = format!(
            "{CHROMIUM} or {CHROMEDRIVER} is missing; install them with \
             `apt-get install chromium chromium-driver`"
        );
        assert!(
            std::env::var("BLIP2_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "BLIP2_REQUIRE_BROWSER=1 but {note}"
        );
        eprintln!("skipping the browser test: {note}");
        return;
    }

    let limits = Limits {
        max_upload_bytes: MAX_UPLOAD_BYTES,
        ..Limits::default()
    };
    let server = TestServer::start(CAPTIONING, limits).await;
    let expected = expected_texts(&server);

    let driver = tokio::task::spawn_blocking(move || Driver::start(Path::new(CHROMEDRIVER)))
        .await
        .unwrap()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().unwrap();
    let session = driver
        .session(chromium, profile.path())
        .await
        .expect("Chromium starts");
    let scratch = tempfile::tempdir().unwrap();

    let outcome = use_page(&session, &server, &expected, scratch.path()).await;
    if let Err(error) = &outcome {
        match session.screenshot().await {
            Ok(png) => {
                let path = screenshot_path();
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, png).unwrap();
                eprintln!("the page test failed; screenshot: {}", path.display());
            }
            Err(screenshot_error) => eprintln!("no screenshot: {screenshot_error}"),
        }
        eprintln!("error: {error}");
    }
    let closed = session.close().await;
    drop(driver);
    server.stop().await;
    outcome.expect("the page works");
    closed.expect("the browser session closes");
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-test")
        .join("failure.png")
}

fn expected_texts(server: &TestServer) -> Expected {
    let image = blip2_image::decode_image(&photo("rocket.jpg"), &Default::default()).unwrap();
    let options = server.blip2.default_generation_options();
    let caption = server.blip2.caption(&image, None, &options).unwrap().text;
    let mut conversation = Conversation::new(&server.blip2, &image).unwrap();
    let answer = conversation.ask(QUESTION, &options, None).unwrap().text;
    Expected { caption, answer }
}

/// The text the page shows for `text`: the text, or its note for an empty one.
fn shown(text: &str, empty_note: &str) -> String {
    if text.is_empty() {
        empty_note.to_owned()
    } else {
        text.to_owned()
    }
}

fn check(condition: bool, message: impl Into<String>) -> Result<()> {
    if condition {
        Ok(())
    } else {
        Err(message.into().into())
    }
}

async fn use_page(
    session: &Session<'_>,
    server: &TestServer,
    expected: &Expected,
    scratch: &Path,
) -> Result<()> {
    session.set_script_timeout(Duration::from_secs(60)).await?;
    session.goto(&server.url("/")).await?;
    let info = session.wait_for("#model-info", "text", &["Model:"]).await?;
    let info = info["text"].as_str().unwrap_or_default();
    check(info.contains("opt-tiny"), format!("model line {info:?}"))?;

    // Choose a photo and caption it.
    let encoded = server.blip2.model().images_encoded();
    let rocket = photo_path("rocket.jpg").canonicalize()?;
    session
        .send_keys("#file-input", &rocket.display().to_string())
        .await?;
    session.wait_for("#caption-button", "enabled", &[]).await?;
    session.click("#caption-button").await?;
    let caption = session
        .wait_for("#caption", "state", &["done", "error"])
        .await?;
    check(
        caption["state"] == "done",
        format!("captioning failed: {caption}"),
    )?;
    let want = shown(&expected.caption, "(the model wrote an empty caption)");
    check(
        caption["text"] == want.as_str(),
        format!(
            "the page shows the caption {} but the library wrote {want:?}",
            caption["text"]
        ),
    )?;

    // Ask a question; the answer streams into the chat and reuses the caption's encoding.
    session.send_keys("#question", QUESTION).await?;
    session.click("#ask-button").await?;
    let answer = session
        .wait_for("#messages li.bot", "state", &["done", "error"])
        .await?;
    check(
        answer["state"] == "done",
        format!("the question failed: {answer}"),
    )?;
    let want = shown(&expected.answer, "(the model gave an empty answer)");
    check(
        answer["text"] == want.as_str(),
        format!(
            "the page shows the answer {} but the library gave {want:?}",
            answer["text"]
        ),
    )?;
    let user = session
        .wait_for("#messages li.user", "text", &[QUESTION])
        .await?;
    check(
        user["text"] == QUESTION,
        format!("question shown as {user}"),
    )?;
    check(
        server.blip2.model().images_encoded() == encoded + 1,
        "the page's question encoded the photo again instead of reusing the caption's session",
    )?;

    // A follow-up goes into the same chat.
    session.send_keys("#question", "and then?").await?;
    session.click("#ask-button").await?;
    session
        .wait_for(
            "#messages li.bot:nth-of-type(4)",
            "state",
            &["done", "error"],
        )
        .await?;
    let count = session
        .execute(
            "return document.querySelectorAll('#messages li.bot').length",
            json!([]),
        )
        .await?;
    check(
        count == 2,
        format!("{count} answers in the chat after two questions"),
    )?;

    // A photo over the upload limit is refused in words, before it is sent.
    let astronaut = photo_path("astronaut.png").canonicalize()?;
    session
        .send_keys("#file-input", &astronaut.display().to_string())
        .await?;
    let error = session.wait_for("#error", "visible", &[]).await?;
    let text = error["text"].as_str().unwrap_or_default();
    check(
        text.contains("larger than this server accepts") && text.contains("max_upload_bytes"),
        format!("oversized upload error {text:?}"),
    )?;

    // A file that is not an image is sent, and the server's error is shown.
    let notes = scratch.join("notes.png");
    std::fs::write(&notes, "just some text")?;
    session
        .send_keys("#file-input", &notes.display().to_string())
        .await?;
    session.wait_for("#caption-button", "enabled", &[]).await?;
    session.click("#caption-button").await?;
    session.wait_for("#caption", "state", &["error"]).await?;
    let error = session.wait_for("#error", "visible", &[]).await?;
    let text = error["text"].as_str().unwrap_or_default();
    check(
        text.contains("notes.png") && text.contains("not a supported image"),
        format!("bad image error {text:?}"),
    )?;

    // At phone width nothing sticks out sideways.
    session.set_window_size(390, 844).await?;
    let width = session
        .execute("return window.innerWidth", json!([]))
        .await?;
    check(
        width.as_i64().is_some_and(|w| w <= 390),
        format!("the window is {width} px wide, not phone width"),
    )?;
    let overflow = session
        .execute(
            "const root = document.documentElement; return root.scrollWidth - root.clientWidth",
            json!([]),
        )
        .await?;
    check(
        overflow.as_i64() == Some(0),
        format!("the page is {overflow} px wider than a phone screen"),
    )?;
    Ok(())
}
