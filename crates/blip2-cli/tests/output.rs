//! Where results go and how a run ends when they cannot be written: a full disk is an
//! error, a closed pipe stops without a message. Also the per-item reports of `match` and
//! `classify`, and flags refused before anything loads.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    let path = repo().join("tests/fixtures/models").join(name);
    path.display().to_string()
}

fn photo(name: &str) -> String {
    repo().join("images").join(name).display().to_string()
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_blip2"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn run(args: &[&str]) -> Output {
    command(args).stdout(Stdio::piped()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(target_os = "linux")]
#[test]
fn results_that_cannot_be_written_are_errors() {
    let (cat, opt, itm) = (
        photo("chelsea.png"),
        fixture("opt-tiny"),
        fixture("itm-tiny"),
    );
    let runs: [&[&str]; 5] = [
        &["caption", &cat, "--model", &opt],
        &["caption", &cat, "--json", "--model", &opt],
        &["ask", &cat, "what is it?", "--model", &opt],
        &["match", &cat, "a cat", "--model", &itm],
        &["classify", &cat, "--labels", "a cat,a dog", "--model", &itm],
    ];
    for args in runs {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let output = command(args).stdout(full).output().unwrap();
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot write to standard output"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn closed_pipe_stops_without_message() {
    let mut child = command(&[
        "caption",
        &photo("chelsea.png"),
        "--model",
        &fixture("opt-tiny"),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    // The reader goes before the model has loaded, so the first result meets a closed pipe.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = text(&output.stderr);
    // The status a process ended by SIGPIPE gets from a shell: a pipeline with `pipefail`
    // still reports that not every item was processed.
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
}

#[test]
fn match_reports_a_text_too_long_by_position() {
    let long = "cat ".repeat(60);
    let output = run(&[
        "match",
        &photo("chelsea.png"),
        "a cat",
        &long,
        "a rocket",
        "--model",
        &fixture("itm-tiny"),
    ]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("TEXT 2"), "{stderr}");
    assert!(stderr.contains("reads at most"), "{stderr}");
    assert!(
        !stderr.contains(long.trim()),
        "the long text is quoted whole: {stderr}"
    );
    assert!(
        stderr.contains("1 of 3 texts could not be scored"),
        "{stderr}"
    );
    assert!(
        stdout.contains("a cat") && stdout.contains("a rocket"),
        "{stdout}"
    );
}

#[test]
fn classify_counts_unreadable_images() {
    let temp = tempfile::tempdir().unwrap();
    let broken = temp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let output = run(&[
        "classify",
        &photo("chelsea.png"),
        broken.to_str().unwrap(),
        "--labels",
        "a cat,a dog",
        "--model",
        &fixture("itm-tiny"),
    ]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 of 2 images could not be classified"),
        "{stderr}"
    );
    assert!(
        text(&output.stdout).contains("a cat"),
        "the readable image is scored"
    );
}

#[test]
fn flags_are_checked_before_loading() {
    let cases: [(&[&str], &str); 5] = [
        // Scoring commands have no language model to quantize.
        (
            &["match", "x.png", "a cat", "--quantize", "q8"],
            "--quantize",
        ),
        (&["serve", "--max-upload-bytes", "0"], "--max-upload-bytes"),
        (
            &["serve", "--request-timeout-secs", "0"],
            "--request-timeout-secs",
        ),
        (&["serve", "--host", "example.com"], "not an IP address"),
        (&["caption", "x.png", "--prompt", "   "], "only whitespace"),
    ];
    for (args, expected) in cases {
        let output = run(args);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn npy_outputs_list_their_rows() {
    let temp = tempfile::tempdir().unwrap();
    let broken = temp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let rocket = photo("rocket.jpg");
    let out = temp.path().join("features.npy");
    let output = run(&[
        "embed",
        broken.to_str().unwrap(),
        &rocket,
        "--text",
        "a rocket",
        "-o",
        out.to_str().unwrap(),
        "--model",
        &fixture("itm-tiny"),
    ]);
    assert!(!output.status.success(), "the broken photo is reported");
    let inputs = std::fs::read_to_string(temp.path().join("features.inputs.json")).unwrap();
    let inputs: serde_json::Value = serde_json::from_str(&inputs).unwrap();
    assert_eq!(inputs["images"], serde_json::json!([rocket]));
    assert_eq!(inputs["texts"], serde_json::json!(["a rocket"]));
}

#[test]
fn match_reads_image_without_texts() {
    let output = run(&["match", "missing.png", " ", "--model", &fixture("itm-tiny")]);
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("missing.png"), "{stderr}");
}
