//! The demo page and its example photos, compiled into the binary: nothing is read from
//! the file system while serving.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const STYLE_CSS: &str = include_str!("../assets/style.css");

/// Example photos offered on the page: smaller JPEG copies of photos in the repository's
/// `images/` folder (see `assets/examples/SOURCES.md`).
const EXAMPLES: &[(&str, &[u8])] = &[
    ("cat.jpg", include_bytes!("../assets/examples/cat.jpg")),
    (
        "coffee.jpg",
        include_bytes!("../assets/examples/coffee.jpg"),
    ),
    (
        "rocket.jpg",
        include_bytes!("../assets/examples/rocket.jpg"),
    ),
];

/// Routes the page and its assets; they need no state.
pub(crate) fn router() -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/examples/{name}", get(example))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn example(Path(name): Path<String>) -> Response {
    match EXAMPLES.iter().find(|(example, _)| *example == name) {
        Some((_, bytes)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg")),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=86400"),
                ),
            ],
            *bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such example photo\n").into_response(),
    }
}
