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
