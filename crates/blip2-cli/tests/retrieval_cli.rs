//! `blip2 embed`, `match`, `classify`, `index` and `search` on the retrieval fixtures,
//! including an indexing run killed midway and resumed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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

fn blip2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the blip2 binary starts")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn reference() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/reference/itm-tiny.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn match_and_classify_report_reference_scores() {
    let meta = reference();
    let expected = candle_core::safetensors::load(
        repo().join("tests/fixtures/reference/itm-tiny.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let probabilities = expected["itm_probability"]
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let photo = repo().join("images/chelsea.png").display().to_string();
    let texts: Vec<String> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();

    let mut args = vec!["match", photo.as_str(), "--json", "--model"];
    let model_path = model("itm-tiny");
    args.push(&model_path);
    args.extend(texts.iter().map(String::as_str));
    let output = blip2(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    for (t, score) in line["scores"].as_array().unwrap().iter().enumerate() {
        assert_eq!(score["text"], texts[t].as_str());
        let got = score["itm_probability"].as_f64().unwrap() as f32;
        assert!(
            (got - probabilities[t]).abs() < 1e-5,
            "text {t}: {got} vs {}",
            probabilities[t]
        );
    }

    let labels = texts.join(",");
    let output = blip2(&[
        "classify",
        &photo,
        "--labels",
        &labels,
        "--json",
        "--model",
        &model_path,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let line: serde_json::Value = serde_json::from_str(text(&output.stdout).trim()).unwrap();
    let ranked: Vec<f64> = line["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["itm_probability"].as_f64().unwrap())
        .collect();
    assert!(
        ranked.windows(2).all(|w| w[0] >= w[1]),
        "labels sorted by probability: {ranked:?}"
    );
    assert_eq!(ranked.len(), texts.len());

    let output = blip2(&[
        "classify",
        &photo,
        "--labels",
        " , ",
        "--model",
        &model_path,
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--labels is empty"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn embed_writes_named_tensors_and_refuses_missing_projections() {
    let temp = tempfile::tempdir().unwrap();
    let photo = repo().join("images/rocket.jpg").display().to_string();
    let out = temp.path().join("features.safetensors");
    let output = blip2(&[
        "embed",
        &photo,
        "-o",
        out.to_str().unwrap(),
        "--text",
        "a rocket",
        "--model",
        &model("itm-tiny"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "image_embeds",
            "pixel_values",
            "qformer_last_hidden_state",
            "text_embeds",
            "vision_last_hidden_state"
        ]
    );
    assert_eq!(tensors["image_embeds"].dims(), &[1, 6, 16]);

    let npy = temp.path().join("caption.npy");
    let output = blip2(&[
        "embed",
        &photo,
        "-o",
        npy.to_str().unwrap(),
        "--model",
        &model("opt-tiny"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        temp.path()
            .join("caption.qformer_last_hidden_state.npy")
            .exists()
    );
    assert!(
        !temp.path().join("caption.image_embeds.npy").exists(),
        "a captioning checkpoint has no image_embeds"
    );
    let output = blip2(&[
        "embed",
        &photo,
        "-o",
        npy.to_str().unwrap(),
        "--text",
        "x",
        "--model",
        &model("opt-tiny"),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no projection heads"),
        "{}",
        text(&output.stderr)
    );

    let output = blip2(&[
        "embed",
        &photo,
        "-o",
        "features.txt",
        "--model",
        &model("itm-tiny"),
    ]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains(".safetensors or .npy"));
}

fn copies(dir: &Path, count: usize) {
    let photos = [
        "chelsea.png",
        "rocket.jpg",
        "coffee.png",
        "astronaut.png",
        "camera.png",
    ];
    for i in 0..count {
        let name = photos[i % photos.len()];
        let extension = Path::new(name).extension().unwrap().to_str().unwrap();
        std::fs::copy(
            repo().join("images").join(name),
            dir.join(format!("photo{i:03}.{extension}")),
        )
        .unwrap();
    }
}

fn index_files(dir: &Path) -> Vec<Vec<u8>> {
    ["index.json", "embeddings.npy", "entries.jsonl"]
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect()
}

#[test]
fn killed_index_run_resumes_to_the_uninterrupted_result() {
    let temp = tempfile::tempdir().unwrap();
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 40);
    let model_path = model("itm-tiny");

    let whole = temp.path().join("whole.index");
    let output = blip2(&[
        "index",
        photos.to_str().unwrap(),
        "-o",
        whole.to_str().unwrap(),
        "--model",
        &model_path,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));

    let resumed = temp.path().join("resumed.index");
    let mut child = Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args([
            "index",
            photos.to_str().unwrap(),
            "-o",
            resumed.to_str().unwrap(),
            "--model",
            &model_path,
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().starts_with("[2/40]") {
            child.kill().unwrap();
            break;
        }
    }
    child.wait().unwrap();
    let logged = std::fs::read_to_string(resumed.join("entries.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(
        logged < 40,
        "the run was killed before it finished ({logged} photos logged)"
    );

    let output = blip2(&[
        "index",
        photos.to_str().unwrap(),
        "-o",
        resumed.to_str().unwrap(),
        "--model",
        &model_path,
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains(&format!("{} to encode", 40 - logged)),
        "{}",
        text(&output.stderr)
    );
    assert!(
        index_files(&resumed) == index_files(&whole),
        "the resumed index equals the uninterrupted one"
    );

    // Search through the CLI, with the model recorded in the index.
    let output = blip2(&[
        "search",
        whole.to_str().unwrap(),
        "a cup of coffee",
        "--top-k",
        "3",
        "--json",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).lines().count(), 3);
}

#[test]
fn search_ranks_repo_photos_like_reference_and_refuses_other_models() {
    let temp = tempfile::tempdir().unwrap();
    let index = temp.path().join("photos.index");
    let photos = repo().join("images");
    let output = blip2(&[
        "index",
        photos.to_str().unwrap(),
        "-o",
        index.to_str().unwrap(),
        "--model",
        &model("itm-tiny"),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let meta = reference();
    let names: Vec<&str> = meta["photos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    for ranking in meta["rankings"].as_array().unwrap() {
        let query = ranking["text"].as_str().unwrap();
        for (flag, key) in [(None, "itc"), (Some("--rerank"), "rerank")] {
            let mut args = vec![
                "search",
                index.to_str().unwrap(),
                query,
                "--top-k",
                "5",
                "--json",
            ];
            args.extend(flag);
            let output = blip2(&args);
            assert!(output.status.success(), "{}", text(&output.stderr));
            let got: Vec<String> = text(&output.stdout)
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    Path::new(v["path"].as_str().unwrap())
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            let expected: Vec<&str> = ranking[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| names[i.as_u64().unwrap() as usize])
                .collect();
            assert_eq!(got, expected, "{key} ranking for {query:?}");
        }
    }
    let output = blip2(&[
        "search",
        index.to_str().unwrap(),
        "a cat",
        "--model",
        &model("itm-wide"),
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("itm-tiny"),
        "{}",
        text(&output.stderr)
    );
}

fn blip2_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blip2"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the blip2 binary starts")
}

#[test]
fn search_resolves_relative_model_path() {
    let temp = tempfile::tempdir().unwrap();
    let checkpoint = temp.path().join("models/itm-tiny");
    std::fs::create_dir_all(&checkpoint).unwrap();
    for entry in std::fs::read_dir(model("itm-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), checkpoint.join(entry.file_name())).unwrap();
    }
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 3);
    let elsewhere = temp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();

    let output = blip2_in(
        temp.path(),
        &[
            "index",
            "photos",
            "-o",
            "photos.index",
            "--model",
            "models/itm-tiny",
        ],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let manifest_path = temp.path().join("photos.index/index.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let recorded = manifest["model"].as_str().unwrap().to_owned();
    assert!(
        Path::new(&recorded).is_absolute(),
        "index.json records {recorded}"
    );
    assert_eq!(
        Path::new(&recorded),
        checkpoint.canonicalize().unwrap(),
        "index.json records the checkpoint"
    );

    let index = temp.path().join("photos.index").display().to_string();
    let search = || blip2_in(&elsewhere, &["search", &index, "a cup of coffee", "--json"]);
    let output = search();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).lines().count(), 3);

    // Indexes of earlier versions record the path as typed; it is taken relative to the
    // folder that contains the index, not to the working directory.
    manifest["model"] = "models/itm-tiny".into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let output = search();
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).lines().count(), 3);
}

#[test]
fn match_reports_empty_texts() {
    let photo = repo().join("images/chelsea.png").display().to_string();
    let model_path = model("itm-tiny");
    let scores_of = |texts: &[&str]| {
        let mut args = vec!["match", photo.as_str(), "--json", "--model", &model_path];
        args.extend(texts);
        let output = blip2(&args);
        let line: serde_json::Value = serde_json::from_str(text(&output.stdout).trim())
            .unwrap_or_else(|e| panic!("{e}: {}", text(&output.stderr)));
        (output, line["scores"].as_array().unwrap().clone())
    };

    let (output, scores) = scores_of(&["a cat", "  ", "a rocket", ""]);
    assert!(
        !output.status.success(),
        "empty texts make the exit status non-zero"
    );
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("2 of 4 texts could not be scored"),
        "{stderr}"
    );
    assert_eq!(scores.len(), 4, "one entry per text: {scores:?}");
    for (index, position) in [(1, "TEXT 2"), (3, "TEXT 4")] {
        let error = scores[index]["error"].as_str().unwrap_or_default();
        assert!(error.contains(position), "entry {index}: {}", scores[index]);
        assert!(
            error.contains("is empty"),
            "entry {index}: {}",
            scores[index]
        );
        assert!(scores[index].get("itm_probability").is_none());
        assert!(stderr.contains(position), "{stderr}");
    }
    let (clean, expected) = scores_of(&["a cat", "a rocket"]);
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    assert_eq!(scores[0], expected[0]);
    assert_eq!(scores[2], expected[1]);

    let temp = tempfile::tempdir().unwrap();
    let output = blip2(&["search", temp.path().to_str().unwrap(), " \t"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("QUERY"), "{stderr}");
    assert!(stderr.contains("is empty"), "{stderr}");

    let out = temp.path().join("features.safetensors");
    let output = blip2(&[
        "embed",
        &photo,
        "-o",
        out.to_str().unwrap(),
        "--text",
        "a cat",
        "--text",
        " ",
        "--model",
        &model_path,
    ]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--text 2"),
        "{}",
        text(&output.stderr)
    );
    let tensors = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        tensors["text_embeds"].dims(),
        &[1, 16],
        "the other text is embedded"
    );
}

#[test]
fn classify_wrong_checkpoint_fails_once() {
    let photo = repo().join("images/chelsea.png").display().to_string();
    let rocket = repo().join("images/rocket.jpg").display().to_string();
    let output = blip2(&[
        "classify",
        &photo,
        &rocket,
        "--labels",
        "a cat,a rocket",
        "--model",
        &model("opt-tiny"),
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert_eq!(stderr.matches("no projection heads").count(), 1, "{stderr}");
}

#[cfg(unix)]
#[test]
fn safetensors_output_has_npy_permissions() {
    use std::os::unix::fs::PermissionsExt;

    let temp = tempfile::tempdir().unwrap();
    let photo = repo().join("images/rocket.jpg").display().to_string();
    for name in ["features.safetensors", "features.npy"] {
        let out = temp.path().join(name);
        let output = blip2(&[
            "embed",
            &photo,
            "-o",
            out.to_str().unwrap(),
            "--model",
            &model("itm-tiny"),
        ]);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let mode = |name: &str| {
        std::fs::metadata(temp.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("features.safetensors"),
        mode("features.pixel_values.npy"),
        "modes {:o} and {:o}",
        mode("features.safetensors"),
        mode("features.pixel_values.npy")
    );
}

/// Builds an index of `folder` in `index` with the tiny retrieval checkpoint.
fn build_index(folder: &Path, index: &Path) -> Output {
    blip2(&[
        "index",
        folder.to_str().unwrap(),
        "-o",
        index.to_str().unwrap(),
        "--model",
        &model("itm-tiny"),
    ])
}

#[test]
fn index_reports_each_unreadable_photo_once() {
    let temp = tempfile::tempdir().unwrap();
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 2);
    std::fs::write(photos.join("broken.jpg"), b"not a jpeg").unwrap();

    let output = build_index(&photos, &temp.path().join("photos.index"));
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.matches("broken.jpg").count(), 1, "{stderr}");
    assert!(stderr.contains("error: "), "{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(stderr.contains("3 photos found"), "{stderr}");
    assert!(stderr.contains("2 photos in "), "{stderr}");

    let single = temp.path().join("single");
    std::fs::create_dir(&single).unwrap();
    copies(&single, 1);
    let output = build_index(&single, &temp.path().join("single.index"));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("1 photo found,"), "{stderr}");
    assert!(stderr.contains("1 photo in "), "{stderr}");
}

#[test]
fn rerank_reports_unreadable_photos() {
    let temp = tempfile::tempdir().unwrap();
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 3);
    let index = temp.path().join("photos.index");
    let output = build_index(&photos, &index);
    assert!(output.status.success(), "{}", text(&output.stderr));
    // One photo is damaged and one deleted after indexing.
    let damaged = photos.join("photo001.jpg");
    std::fs::write(&damaged, b"not a jpeg any more").unwrap();
    let deleted = photos.join("photo002.png");
    std::fs::remove_file(&deleted).unwrap();
    let index = index.to_str().unwrap();
    let search = [
        "search",
        index,
        "a cup of coffee",
        "--top-k",
        "3",
        "--rerank",
    ];

    let output = blip2(&[&search[..], &["--json"][..]].concat());
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
    let lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one result and two errors: {lines:?}");
    assert!(lines[0]["rank"].is_number(), "{}", lines[0]);
    for path in [&damaged, &deleted] {
        let path = path.display().to_string();
        let line = lines
            .iter()
            .find(|line| line["path"] == path.as_str() && line.get("rank").is_none())
            .unwrap_or_else(|| panic!("no error line for {path}: {lines:?}"));
        assert!(
            !line["error"].as_str().unwrap_or_default().is_empty(),
            "{line}"
        );
    }

    let output = blip2(&search);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).lines().count(), 1);
    let stderr = text(&output.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
    for name in ["photo001.jpg", "photo002.png"] {
        assert_eq!(stderr.matches(name).count(), 1, "{stderr}");
    }
    assert_eq!(stderr.matches("error: ").count(), 2, "{stderr}");
}

#[test]
fn candidates_below_top_k_are_rejected() {
    let temp = tempfile::tempdir().unwrap();
    let index = temp.path().to_str().unwrap();
    for (candidates, top_k) in [("2", "5"), ("0", "10")] {
        let output = blip2(&[
            "search",
            index,
            "a cat",
            "--rerank",
            "--top-k",
            top_k,
            "--candidates",
            candidates,
        ]);
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&format!(
                "--candidates {candidates} is below --top-k {top_k}"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn output_path_errors_say_what_failed() {
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("notes.txt");
    std::fs::write(&file, "a file").unwrap();
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 1);
    let itm = model("itm-tiny");

    let npy = file.join("out.npy");
    let output = blip2(&[
        "embed",
        &repo().join("images/rocket.jpg").display().to_string(),
        "-o",
        npy.to_str().unwrap(),
        "--model",
        &itm,
    ]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cannot write"), "{stderr}");
    assert!(!stderr.contains("cannot read"), "{stderr}");

    let output = build_index(&photos, &file);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("notes.txt is a file, not a photo index directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot read"), "{stderr}");

    let output = build_index(&photos, &file.join("photos.index"));
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("cannot create"), "{stderr}");
    assert!(!stderr.contains("cannot read"), "{stderr}");

    let output = blip2(&["search", file.to_str().unwrap(), "a cat"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("notes.txt is a file, not a photo index directory"),
        "{stderr}"
    );
    assert!(stderr.contains("`blip2 index"), "{stderr}");
}

#[test]
fn damaged_log_line_names_line_and_fields() {
    let temp = tempfile::tempdir().unwrap();
    let photos = temp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    copies(&photos, 2);
    let index = temp.path().join("photos.index");
    let output = build_index(&photos, &index);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let log = index.join("entries.jsonl");
    let good = std::fs::read_to_string(&log).unwrap();
    let first = good.lines().next().unwrap();

    let cases = [
        (
            r#"{"row": 1, "path": "/photos/a.png", "size": 10}"#,
            "missing field `modified`",
        ),
        (r#"{"photo": "/photos/a.png"}"#, "missing field `row`"),
        (r#"{"removed": 3}"#, "invalid type"),
        ("[1, 2]", "not a JSON object"),
        ("{row", "invalid JSON"),
    ];
    for (line, expected) in cases {
        std::fs::write(&log, format!("{first}\n{line}\n")).unwrap();
        let output = blip2(&["search", index.to_str().unwrap(), "a cat"]);
        assert!(!output.status.success(), "{line}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains("entries.jsonl: line 2: "),
            "{line}: {stderr}"
        );
        assert!(stderr.contains(expected), "{line}: {stderr}");
        assert!(
            stderr.contains(r#"{"row", "path", "size", "modified"}"#),
            "{line}: {stderr}"
        );
        assert!(stderr.contains(r#"{"removed"}"#), "{line}: {stderr}");
        assert!(!stderr.contains("untagged"), "{line}: {stderr}");
    }
}

#[test]
fn max_pixels_option_limits_images() {
    let temp = tempfile::tempdir().unwrap();
    let rocket = repo().join("images/rocket.jpg").display().to_string();
    let out = temp.path().join("features.safetensors");
    let embed = |max_pixels: &str| {
        blip2(&[
            "embed",
            &rocket,
            "-o",
            out.to_str().unwrap(),
            "--model",
            &model("itm-tiny"),
            "--max-pixels",
            max_pixels,
        ])
    };

    // rocket.jpg is 640x427 = 273,280 pixels.
    let output = embed("200000");
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("640x427"), "{stderr}");
    assert!(stderr.contains("limit of 200000 pixels"), "{stderr}");
    assert!(stderr.contains("--max-pixels"), "{stderr}");

    let output = embed("273280");
    assert!(output.status.success(), "{}", text(&output.stderr));

    let output = embed("0");
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("--max-pixels"));
}
