//! Broken checkpoints give errors that name the file, field or tensor at fault.

mod common;

use std::path::{Path, PathBuf};

use blip2::pipeline::{Blip2, Error, LoadOptions};
use common::model_dir;

/// A writable copy of a fixture checkpoint.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (temp, dir)
}

fn load_error(dir: &Path) -> Error {
    Blip2::from_dir(dir, &LoadOptions::default()).expect_err("loading should fail")
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

#[test]
fn mistyped_config_field_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    edit_json(&dir.join("config.json"), |v| {
        v["vision_config"]["hidden_size"] = "wide".into()
    });
    let message = load_error(&dir).to_string();
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("vision_config.hidden_size"), "{message}");
}

#[test]
fn unknown_text_model_type_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    edit_json(&dir.join("config.json"), |v| {
        v["text_config"]["model_type"] = "gpt9".into()
    });
    let message = load_error(&dir).to_string();
    assert!(message.contains("gpt9"), "{message}");
    assert!(message.contains("text_config"), "{message}");
}

#[test]
fn non_blip2_model_type_is_rejected() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    edit_json(&dir.join("config.json"), |v| {
        v["model_type"] = "clip".into()
    });
    let error = load_error(&dir);
    assert!(matches!(error, Error::Unsupported { .. }), "{error}");
    assert!(error.to_string().contains("\"clip\""), "{error}");
}

#[test]
fn invalid_config_value_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    edit_json(&dir.join("config.json"), |v| {
        v["qformer_config"]["num_attention_heads"] = 5.into()
    });
    let message = load_error(&dir).to_string();
    assert!(
        message.contains("qformer_config.num_attention_heads"),
        "{message}"
    );
}

#[test]
fn wrongly_shaped_weight_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let name = "language_projection.weight";
    let wrong = tensors[name].narrow(0, 0, 5).unwrap();
    tensors.insert(name.to_string(), wrong);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::Weights { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains(name), "{message}");
    assert!(message.contains("shape"), "{message}");
}

#[test]
fn missing_weight_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    tensors.remove("qformer.layernorm.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = load_error(&dir).to_string();
    assert!(message.contains("qformer.layernorm.weight"), "{message}");
}

#[test]
fn missing_tokenizer_is_reported() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::MissingFile { .. }), "{error}");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

#[test]
fn corrupt_tokenizer_is_reported() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": ").unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::Tokenizer { .. }), "{error}");
    assert!(error.to_string().contains("tokenizer.json"), "{error}");
}

#[test]
fn pickle_only_checkpoint_is_refused_with_conversion_hint() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    // Not a real pickle: the loader must refuse before reading it.
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::PickleOnly { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("pytorch_model.bin"), "{message}");
    assert!(message.contains("safetensors"), "{message}");
}

#[test]
fn missing_shard_is_named() {
    let (_temp, dir) = copy_fixture("opt-proj-sharded");
    std::fs::remove_file(dir.join("model-00002-of-00004.safetensors")).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::MissingFile { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("model-00002-of-00004.safetensors"),
        "{error}"
    );
}

#[test]
fn truncated_weights_are_reported() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let error = load_error(&dir);
    assert!(matches!(error, Error::Weights { .. }), "{error}");
}

#[test]
fn missing_directory_and_config_are_reported() {
    let error = load_error(Path::new("/nonexistent/blip2-checkpoint"));
    assert!(
        error.to_string().contains("/nonexistent/blip2-checkpoint"),
        "{error}"
    );
    let (_temp, dir) = copy_fixture("opt-tiny");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert!(load_error(&dir).to_string().contains("config.json"));
}

#[test]
fn bad_processor_config_is_named() {
    let (_temp, dir) = copy_fixture("opt-tiny");
    edit_json(&dir.join("processor_config.json"), |v| {
        v["image_processor"]["image_mean"] = "grey".into()
    });
    let message = load_error(&dir).to_string();
    assert!(message.contains("processor_config.json"), "{message}");
    assert!(message.contains("image_mean"), "{message}");
}
