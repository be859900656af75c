//! The `blip2` binary end to end on the fixture checkpoints: output formats, bad
//! inputs in a batch, and chat sessions driven through standard input.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> String {
    repo()
        .join("tests/fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn photo(name: &str) -> String {
    repo().join("images").join(name).display().to_string()
}

fn blip2(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the blip2 binary starts");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn caption_json_reports_bad_files_and_captions_the_rest() {
    let temp = tempfile::tempdir().unwrap();
    let not_image = temp.path().join("notes.png");
    std::fs::write(&not_image, "just text").unwrap();
    let empty = temp.path().join("empty.jpg");
    std::fs::write(&empty, b"").unwrap();
    let missing = temp.path().join("missing.png");
    let truncated = temp.path().join("truncated.png");
    let bytes = std::fs::read(repo().join("images/chelsea.png")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();

    let chelsea = photo("chelsea.png");
    let rocket = photo("rocket.jpg");
    let paths = [
        chelsea.as_str(),
        not_image.to_str().unwrap(),
        empty.to_str().unwrap(),
        rocket.as_str(),
        missing.to_str().unwrap(),
        truncated.to_str().unwrap(),
    ];
    let model_path = model("opt-tiny");
    let mut args = vec![
        "caption",
        "--model",
        &model_path,
        "--json",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    ];
    args.extend(paths);
    let output = blip2(&args, None);
    assert!(
        !output.status.success(),
        "bad images make the exit status non-zero"
    );
    let stdout = text(&output.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        paths.len(),
        "one JSON line per image: {stdout}"
    );
    for (line, path) in lines.iter().zip(paths) {
        assert_eq!(line["image"], path);
    }
    assert_eq!(
        lines[0]["token_ids"],
        serde_json::json!([185, 46, 180]),
        "chelsea caption tokens (reference)"
    );
    assert!(
        lines[3]["caption"].is_string(),
        "rocket.jpg is captioned: {}",
        lines[3]
    );
    for index in [1, 2, 4, 5] {
        assert!(
            lines[index]["error"].is_string(),
            "item {index} reports an error: {}",
            lines[index]
        );
        assert!(lines[index].get("caption").is_none());
    }
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("not a supported image")
    );
    assert!(lines[2]["error"].as_str().unwrap().contains("empty"));
    assert!(lines[4]["error"].as_str().unwrap().contains("not found"));
    assert!(text(&output.stderr).contains("4 of 6 images could not be captioned"));
}

#[test]
fn caption_plain_text_with_prompt_and_beams() {
    let model_path = model("opt-postln");
    let chelsea = photo("chelsea.png");
    let output = blip2(
        &[
            "caption",
            &chelsea,
            "--model",
            &model_path,
            "--prompt",
            "a photo of",
            "--num-beams",
            "3",
            "--num-return-sequences",
            "2",
            "--max-new-tokens",
            "9",
            "--json",
        ],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    assert_eq!(line["alternatives"].as_array().unwrap().len(), 2);
    assert!(line["score"].is_number());
}

#[test]
fn invalid_options_are_explained() {
    let model_path = model("opt-tiny");
    let chelsea = photo("chelsea.png");
    let output = blip2(
        &[
            "caption",
            &chelsea,
            "--model",
            &model_path,
            "--num-beams",
            "2",
            "--num-return-sequences",
            "3",
        ],
        None,
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("num_return_sequences"),
        "{}",
        text(&output.stderr)
    );

    let output = blip2(
        &[
            "ask",
            &chelsea,
            "why?",
            "--model",
            &model_path,
            "--top-p",
            "0.5",
        ],
        None,
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--sample"),
        "{}",
        text(&output.stderr)
    );

    let output = blip2(
        &[
            "ask",
            &chelsea,
            "why?",
            "--model",
            &model_path,
            "--template",
            "no placeholder",
        ],
        None,
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("{}"),
        "{}",
        text(&output.stderr)
    );

    let output = blip2(
        &["caption", &chelsea, "--model", "/nonexistent/model"],
        None,
    );
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("/nonexistent/model"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn ask_prints_answer_and_json() {
    let model_path = model("flan-t5-tiny");
    let chelsea = photo("chelsea.png");
    let streamed = blip2(
        &[
            "ask",
            &chelsea,
            "what is the cat lying on?",
            "--model",
            &model_path,
            "--max-new-tokens",
            "8",
        ],
        None,
    );
    assert!(streamed.status.success(), "{}", text(&streamed.stderr));
    let json = blip2(
        &[
            "ask",
            &chelsea,
            "what is the cat lying on?",
            "--model",
            &model_path,
            "--max-new-tokens",
            "8",
            "--json",
        ],
        None,
    );
    let line: serde_json::Value = serde_json::from_str(text(&json.stdout).trim()).unwrap();
    assert_eq!(
        text(&streamed.stdout).trim_end_matches('\n'),
        line["answer"].as_str().unwrap()
    );
    assert_eq!(line["question"], "what is the cat lying on?");
    assert!(!line["token_ids"].as_array().unwrap().is_empty());
}

#[test]
fn chat_through_piped_stdin() {
    let model_path = model("opt-tiny");
    let chelsea = photo("chelsea.png");
    let overlong = "a photo of a cat ".repeat(40);
    let input = format!("what is this?\n\nand the color?\n{overlong}\n/reset\nwhat is this?\n");
    let output = blip2(
        &[
            "chat",
            &chelsea,
            "--model",
            &model_path,
            "--max-new-tokens",
            "4",
            "--json",
        ],
        Some(&input),
    );
    assert!(
        output.status.success(),
        "end of input ends the chat cleanly: {}",
        text(&output.stderr)
    );
    let stderr = text(&output.stderr);
    assert!(stderr.contains("empty question skipped"), "{stderr}");
    assert!(
        stderr.contains("positions"),
        "the overlong question is reported: {stderr}"
    );
    assert!(stderr.contains("conversation reset"), "{stderr}");
    let answers: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        answers.len(),
        3,
        "three questions are answered: {answers:?}"
    );
    assert_eq!(
        answers[0]["answer"], answers[2]["answer"],
        "after /reset the first question is answered as before"
    );
    assert_eq!(answers[1]["question"], "and the color?");

    let quit = blip2(
        &[
            "chat",
            &chelsea,
            "--model",
            &model_path,
            "--max-new-tokens",
            "2",
        ],
        Some("/quit\nnever asked\n"),
    );
    assert!(quit.status.success());
    assert!(
        text(&quit.stdout).is_empty(),
        "nothing is answered after /quit"
    );
}

#[test]
fn quantize_saves_layers_that_caption_like_quantizing_at_load() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("opt-tiny.q4.safetensors");
    let file_arg = file.display().to_string();
    let model_path = model("opt-tiny");
    let chelsea = photo("chelsea.png");
    let missing = temp.path().join("missing.png").display().to_string();

    let output = blip2(&["quantize", "--model", &model_path], None);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("nothing to do"),
        "{}",
        text(&output.stderr)
    );

    // A photo that cannot be read is reported; the others are still measured.
    let output = blip2(
        &[
            "quantize",
            "--model",
            &model_path,
            "--kind",
            "q4",
            "-o",
            &file_arg,
            &chelsea,
            &missing,
            "--positions",
            "5",
        ],
        None,
    );
    assert!(!output.status.success());
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("wrote") && stdout.contains("over 5 positions (1 photo)"),
        "{stdout}"
    );
    assert!(
        text(&output.stderr).contains("missing.png"),
        "{}",
        text(&output.stderr)
    );

    let caption = |quantize: &str| {
        let output = blip2(
            &[
                "caption",
                &chelsea,
                "--model",
                &model_path,
                "--quantize",
                quantize,
                "--json",
            ],
            None,
        );
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    assert_eq!(caption(&file_arg), caption("q4"));

    let output = blip2(
        &[
            "caption",
            &chelsea,
            "--model",
            &model_path,
            "--quantize",
            &missing,
        ],
        None,
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("missing.png"), "{stderr}");
    assert!(stderr.contains("no such file exists"), "{stderr}");
}

#[test]
fn quantize_keeps_other_files() {
    let temp = tempfile::tempdir().unwrap();
    let model_path = model("opt-tiny");
    let weights = temp.path().join("model.safetensors");
    std::fs::write(&weights, b"checkpoint bytes").unwrap();
    let photo_copy = temp.path().join("photo.png");
    std::fs::copy(photo("chelsea.png"), &photo_copy).unwrap();
    let photo_arg = photo_copy.display().to_string();
    let folder = format!("{}/", temp.path().display());
    let nested = temp.path().join("no/such/dir/x.safetensors");

    let cases = [
        (
            weights.display().to_string(),
            "is not a file of quantized layers",
        ),
        (photo_arg.clone(), "is one of the photos"),
        (folder, "is a directory"),
        (nested.display().to_string(), "does not exist"),
    ];
    for (target, expected) in cases {
        let output = blip2(
            &[
                "quantize",
                "--model",
                &model_path,
                "-o",
                &target,
                &photo_arg,
            ],
            None,
        );
        assert!(!output.status.success(), "-o {target} succeeded");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(expected), "-o {target}: {stderr}");
    }
    assert_eq!(std::fs::read(&weights).unwrap(), b"checkpoint bytes");
    assert_eq!(
        std::fs::read(&photo_copy).unwrap(),
        std::fs::read(photo("chelsea.png")).unwrap()
    );
}

#[test]
fn quantize_options_are_checked() {
    let chelsea = photo("chelsea.png");
    let (tiny, no_quantizable_layer) = (model("opt-tiny"), model("opt-proj-sharded"));
    let cases = [
        (
            ["--model", &tiny, "--threads", "99999"],
            "--threads 99999 is out of range",
        ),
        (
            ["--model", &tiny, "--quantize", "q16"],
            "expected q8, q4 or a file",
        ),
        (
            ["--model", &no_quantizable_layer, "--quantize", "q8"],
            "none of the language model's",
        ),
    ];
    for (options, expected) in cases {
        let mut args = vec!["caption", &chelsea];
        args.extend(options);
        let output = blip2(&args, None);
        assert!(!output.status.success(), "{options:?} succeeded");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(expected), "{options:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{options:?}: {stderr}");
    }
}

#[test]
fn whole_run_errors_are_reported_once() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("missing.png").display().to_string();
    let (chelsea, rocket, coffee) = (
        photo("chelsea.png"),
        photo("rocket.jpg"),
        photo("coffee.png"),
    );
    let (retrieval, captioning) = (model("itm-tiny"), model("opt-tiny"));
    let cases = [
        (vec!["--model", &retrieval], "without a language model"),
        (
            vec!["--model", &captioning, "--max-new-tokens", "100"],
            "lower max_new_tokens",
        ),
    ];
    for (options, expected) in cases {
        for json in [false, true] {
            let mut args = vec![
                "caption",
                &chelsea,
                &missing,
                &rocket,
                &coffee,
                "--batch-size",
                "2",
            ];
            args.extend(&options);
            if json {
                args.push("--json");
            }
            let output = blip2(&args, None);
            assert!(!output.status.success(), "{args:?} succeeded");
            let stderr = text(&output.stderr);
            assert_eq!(
                stderr.matches(expected).count(),
                1,
                "{args:?}: the error is reported once: {stderr}"
            );
            assert!(
                !stderr.contains("images could not be captioned"),
                "{args:?}: {stderr}"
            );
            assert!(
                text(&output.stdout).is_empty(),
                "{args:?}: nothing is captioned"
            );
        }
    }

    // No question of a chat fits, so the chat stops before the first one.
    let output = blip2(
        &[
            "chat",
            &chelsea,
            "--model",
            &captioning,
            "--max-new-tokens",
            "100",
        ],
        Some("what is this?\nand the color?\n"),
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.matches("lower max_new_tokens").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("--template"), "{stderr}");
}

#[test]
fn prompt_length_error_counts_one_token() {
    // An empty prompt is OPT's start token alone; 100 new tokens do not fit opt-tiny.
    let output = blip2(
        &[
            "caption",
            &photo("chelsea.png"),
            "--model",
            &model("opt-tiny"),
            "--max-new-tokens",
            "100",
        ],
        None,
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("the prompt has 1 token;"), "{stderr}");
}

#[test]
fn model_given_as_file_is_explained() {
    let models = repo().join("tests/fixtures/models");
    let chelsea = photo("chelsea.png");
    let absolute = models
        .join("opt-tiny/model.safetensors")
        .display()
        .to_string();
    // A relative `dir/file` path also has the form of a hub id (`owner/name`).
    for file in [
        absolute.as_str(),
        "opt-tiny/model.safetensors",
        "opt-tiny/config.json",
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_blip2"))
            .args(["caption", &chelsea, "--model", file])
            .current_dir(&models)
            .env_remove("RUST_LOG")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!output.status.success(), "--model {file} succeeded");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&format!("{file} is a file")),
            "--model {file}: {stderr}"
        );
        assert!(
            stderr.contains("--model expects a checkpoint directory"),
            "--model {file}: {stderr}"
        );
        assert!(
            !stderr.contains("HF_HUB_OFFLINE"),
            "--model {file}: {stderr}"
        );
    }
}

#[test]
fn foreign_quantized_file_is_explained() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("opt-tiny.q4.safetensors");
    let file_arg = file.display().to_string();
    let output = blip2(
        &["quantize", "--model", &model("opt-tiny"), "-o", &file_arg],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));

    // opt-postln's fc1 has 48 outputs where opt-tiny's has 64.
    let output = blip2(
        &[
            "caption",
            &photo("chelsea.png"),
            "--model",
            &model("opt-postln"),
            "--quantize",
            &file_arg,
        ],
        None,
    );
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    for expected in [
        file_arg.as_str(),
        "was made from a different checkpoint",
        "tensor model.decoder.layers.0.fc1.scales has shape [64, 1]",
        "this checkpoint expects [48, 1]",
        "blip2 quantize --model CHECKPOINT --kind q4 -o",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn quantize_output_follows_umask() {
    use std::os::unix::fs::PermissionsExt;

    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("opt-tiny.q4.safetensors");
    let output = blip2(
        &[
            "quantize",
            "--model",
            &model("opt-tiny"),
            "-o",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    // The binary inherits this process's umask, so a file created here gets its mode.
    let plain = temp.path().join("plain.txt");
    std::fs::File::create(&plain).unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&file),
        mode(&plain),
        "mode {:o} vs {:o}",
        mode(&file),
        mode(&plain)
    );
    let leftovers: Vec<_> = std::fs::read_dir(temp.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no temporary files are left: {leftovers:?}"
    );
}
