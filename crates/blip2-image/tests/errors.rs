//! Invalid inputs and settings: each returns the right error variant, with a message that
//! names the file, field or value, and nothing panics.

mod common;

use blip2_image::{
    ConfigError, ImageError, ImageProcessorConfig, LoadOptions, PixelBatch, PixelValues, RgbImage,
    decode_image, load_and_preprocess_each, load_image, preprocess, resize,
};
use common::{fixture_dir, manifest};

fn bad(file_name: &str) -> std::path::PathBuf {
    fixture_dir().join("bad").join(file_name)
}

/// The error Pillow raised on a bad fixture file, as recorded in the manifest.
fn pil_error(file_name: &str) -> String {
    let wanted = format!("bad/{file_name}");
    manifest()["bad_inputs"]
        .as_array()
        .expect("manifest.json has `bad_inputs`")
        .iter()
        .find(|entry| entry["file"] == wanted.as_str())
        .and_then(|entry| entry["pil_error"].as_str())
        .unwrap_or_else(|| panic!("manifest.json records no Pillow error for {wanted}"))
        .to_string()
}

#[test]
fn missing_file_is_not_found() {
    let path = fixture_dir().join("inputs/no_such_image.png");
    let error = load_image(&path, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::NotFound { .. }),
        "expected NotFound, got {error:?}"
    );
    assert!(
        error.to_string().contains("no_such_image.png"),
        "message does not name the path: {error}"
    );
}

#[test]
fn directory_is_a_read_error() {
    let error = load_image(fixture_dir().join("inputs"), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::Read { .. }),
        "expected Read, got {error:?}"
    );
    assert!(
        error.to_string().contains("inputs"),
        "message does not name the path: {error}"
    );
}

#[test]
fn empty_file_is_empty() {
    assert!(
        pil_error("empty.png").starts_with("UnidentifiedImageError"),
        "Pillow: {}",
        pil_error("empty.png")
    );
    let error = load_image(bad("empty.png"), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::Empty { .. }),
        "expected Empty, got {error:?}"
    );
    assert!(
        error.to_string().contains("empty.png"),
        "message does not name the file: {error}"
    );
}

#[test]
fn text_file_is_unknown_format() {
    assert!(
        pil_error("text.png").starts_with("UnidentifiedImageError"),
        "Pillow: {}",
        pil_error("text.png")
    );
    let error = load_image(bad("text.png"), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::UnknownFormat { .. }),
        "expected UnknownFormat, got {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("text.png"),
        "message does not name the file: {message}"
    );
    assert!(
        message.contains("54 68 69 73"),
        "message does not show the first bytes: {message}"
    );
}

#[test]
fn truncated_png_is_corrupt() {
    assert!(
        pil_error("truncated.png").contains("truncated"),
        "Pillow: {}",
        pil_error("truncated.png")
    );
    let error = load_image(bad("truncated.png"), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::Corrupt { format: "PNG", .. }),
        "expected Corrupt PNG, got {error:?}"
    );
    assert!(
        error.to_string().contains("truncated.png"),
        "message does not name the file: {error}"
    );
}

#[test]
fn truncated_jpeg_is_corrupt() {
    assert!(
        pil_error("truncated.jpg").contains("truncated"),
        "Pillow: {}",
        pil_error("truncated.jpg")
    );
    let error = load_image(bad("truncated.jpg"), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(error, ImageError::Corrupt { format: "JPEG", .. }),
        "expected Corrupt JPEG, got {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("truncated.jpg"),
        "message does not name the file: {message}"
    );
    assert!(
        message.contains("truncated"),
        "message does not say the file is truncated: {message}"
    );
}

#[test]
fn huge_png_header_is_rejected() {
    assert!(
        pil_error("huge.png").starts_with("DecompressionBombError"),
        "Pillow: {}",
        pil_error("huge.png")
    );
    let options = LoadOptions::default();
    let error = load_image(bad("huge.png"), &options).unwrap_err();
    match &error {
        ImageError::TooManyPixels {
            width,
            height,
            limit,
            ..
        } => {
            assert_eq!((*width, *height), (100_000, 100_000), "declared size");
            assert_eq!(*limit, options.max_pixels, "limit in force");
            assert_eq!(
                *limit, 178_956_970,
                "default limit is Pillow's DecompressionBombError threshold"
            );
        }
        other => panic!("expected TooManyPixels, got {other:?}"),
    }
    let message = error.to_string();
    for part in ["huge.png", "100000x100000", "178956970"] {
        assert!(message.contains(part), "message lacks {part}: {message}");
    }
}

#[test]
fn huge_jpeg_header_is_rejected() {
    // The baseline fixture with its frame header changed to declare 65000x65000 pixels.
    let mut bytes = std::fs::read(fixture_dir().join("inputs/baseline.jpg")).expect("baseline.jpg");
    let frame = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has an SOF0 marker");
    bytes[frame + 5..frame + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
    let error = decode_image(&bytes, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(
            error,
            ImageError::TooManyPixels {
                width: 65_000,
                height: 65_000,
                ..
            }
        ),
        "expected TooManyPixels 65000x65000, got {error:?}"
    );
    assert!(
        error.to_string().contains("<memory>"),
        "message does not name the input: {error}"
    );
}

#[test]
fn pixel_limit_error_names_both_settings() {
    let options = LoadOptions {
        max_pixels: 100,
        ..LoadOptions::default()
    };
    let message = load_image(fixture_dir().join("inputs/rgb.png"), &options)
        .unwrap_err()
        .to_string();
    assert!(message.contains("--max-pixels"), "{message}");
    assert!(message.contains("LoadOptions::max_pixels"), "{message}");
}

#[test]
fn other_format_is_unsupported_format() {
    // A 1x1 binary PPM: a format the image crate recognises but this crate does not decode.
    let error = decode_image(b"P6\n1 1\n255\n\x00\x00\x00", &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&error, ImageError::UnsupportedFormat { format, .. } if format == "PNM"),
        "expected UnsupportedFormat PNM, got {error:?}"
    );
    let message = error.to_string();
    assert!(message.starts_with("<memory>: PNM images"), "{message}");
    assert!(!message.contains("image image"), "{message}");
    assert!(
        message.contains("convert the image to JPEG, PNG"),
        "{message}"
    );
}

#[test]
fn pixel_limit_is_configurable() {
    let options = LoadOptions {
        max_pixels: 100,
        ..LoadOptions::default()
    };
    let error = load_image(fixture_dir().join("inputs/rgb.png"), &options).unwrap_err();
    assert!(
        matches!(
            error,
            ImageError::TooManyPixels {
                width: 48,
                height: 36,
                limit: 100,
                ..
            }
        ),
        "expected TooManyPixels 48x36 over 100, got {error:?}"
    );
}

/// Truncates and corrupts every fixture input in many ways; each decode must return,
/// with a value or an error, and never panic.
#[test]
fn damaged_inputs_never_panic() {
    let inputs = std::fs::read_dir(fixture_dir().join("inputs")).expect("inputs directory");
    let mut decoded = 0;
    let mut rejected = 0;
    for entry in inputs {
        let path = entry.expect("directory entry").path();
        let original = std::fs::read(&path).expect("fixture input");
        let mut variants = Vec::new();
        for fraction in [1, 2, 3, 5, 8, 13, 21] {
            variants.push(original[..original.len() * fraction / 24].to_vec());
        }
        for seed in 1..=12usize {
            let mut damaged = original.clone();
            for k in 0..4 {
                let index = (seed * 7919 + k * 104_729) % damaged.len();
                damaged[index] ^= 0x5A ^ (seed as u8);
            }
            variants.push(damaged);
        }
        for variant in variants {
            let result =
                std::panic::catch_unwind(|| decode_image(&variant, &LoadOptions::default()));
            match result {
                Ok(Ok(_)) => decoded += 1,
                Ok(Err(_)) => rejected += 1,
                Err(_) => panic!("decoding a damaged copy of {} panicked", path.display()),
            }
        }
    }
    assert!(
        rejected > 0,
        "no damaged input was rejected ({decoded} decoded)"
    );
}

#[test]
fn zero_sizes_are_rejected() {
    let image = RgbImage::from_raw(2, 2, vec![0; 12]).expect("2x2 image");
    let error = resize(&image, 0, 5, blip2_image::Resample::Bicubic).unwrap_err();
    assert!(
        matches!(
            error,
            ImageError::ZeroSize {
                width: 0,
                height: 5,
                ..
            }
        ),
        "got {error:?}"
    );
}

#[test]
fn batch_keeps_going_past_bad_files() {
    let inputs = fixture_dir().join("inputs");
    let paths = [
        inputs.join("rgb.png"),
        inputs.join("missing.png"),
        bad("truncated.jpg"),
        inputs.join("p.gif"),
    ];
    let config = ImageProcessorConfig {
        size: blip2_image::ImageSize::new(8, 8),
        ..ImageProcessorConfig::default()
    };
    let results = load_and_preprocess_each(&paths, &LoadOptions::default(), &config);
    assert_eq!(results.len(), 4, "one result per path");
    assert!(results[0].is_ok(), "rgb.png: {:?}", results[0]);
    assert!(
        matches!(results[1], Err(ImageError::NotFound { .. })),
        "missing.png: {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(ImageError::Corrupt { .. })),
        "truncated.jpg: {:?}",
        results[2]
    );
    assert!(results[3].is_ok(), "p.gif: {:?}", results[3]);
}

#[test]
fn stacking_checks_shapes() {
    let a = PixelValues {
        data: vec![0.0; 12],
        shape: [3, 2, 2],
    };
    let b = PixelValues {
        data: vec![0.0; 18],
        shape: [3, 2, 3],
    };
    let error = PixelBatch::stack(&[a.clone(), b]).unwrap_err();
    assert!(
        matches!(error, ImageError::ShapeMismatch { index: 1, .. }),
        "got {error:?}"
    );
    assert!(
        matches!(PixelBatch::stack(&[]), Err(ImageError::EmptyBatch)),
        "empty batch"
    );
    let batch = PixelBatch::stack(&[a.clone(), a]).expect("equal shapes stack");
    assert_eq!(batch.shape, [2, 3, 2, 2], "stacked shape");
}

fn config_error(json: &str) -> ConfigError {
    match ImageProcessorConfig::from_json_str(json, "test_config.json") {
        Ok(config) => panic!("accepted invalid config {json}: {config:?}"),
        Err(error) => error,
    }
}

fn assert_field_error(json: &str, field: &str) {
    let error = config_error(json);
    match &error {
        ConfigError::Field { field: found, .. } => {
            assert_eq!(found, field, "field named by the error for {json}")
        }
        other => panic!("expected a Field error on {field} for {json}, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("test_config.json"),
        "message does not name the file: {message}"
    );
    assert!(
        message.contains(field),
        "message does not name the field: {message}"
    );
}

fn assert_invalid(json: &str, field: &str) {
    let error = config_error(json);
    assert!(
        matches!(&error, ConfigError::Invalid { field: found, .. } if *found == field),
        "expected Invalid {field} for {json}, got {error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("test_config.json") && message.contains(field),
        "message lacks file or field: {message}"
    );
}

#[test]
fn config_wrong_types_name_the_field() {
    assert_field_error(r#"{"do_resize": "yes"}"#, "do_resize");
    assert_field_error(r#"{"size": {"height": -1, "width": 224}}"#, "size.height");
    assert_field_error(r#"{"image_mean": "0.5"}"#, "image_mean");
    assert_field_error(
        r#"{"image_processor": {"size": {"height": 2.5, "width": 224}}}"#,
        "image_processor.size.height",
    );
    assert_field_error(
        r#"{"image_processor": {}, "num_query_tokens": "many"}"#,
        "num_query_tokens",
    );
    assert_field_error(r#"{"image_processor": 7}"#, "image_processor");
}

#[test]
fn config_unknown_filter_is_rejected() {
    let error = config_error(r#"{"resample": 9}"#);
    assert!(
        matches!(&error, ConfigError::Field { field, .. } if field == "resample"),
        "got {error:?}"
    );
    assert!(
        error.to_string().contains('9'),
        "message does not show the value: {error}"
    );
}

#[test]
fn config_invalid_values_are_rejected() {
    assert_invalid(r#"{"image_mean": [0.5, 0.5]}"#, "image_mean");
    assert_invalid(r#"{"image_std": [0.2, 0.0, 0.2]}"#, "image_std");
    assert_invalid(r#"{"size": {"height": 0, "width": 224}}"#, "size");
    assert_invalid(r#"{"size": {"shortest_edge": 224}}"#, "size");
    assert_invalid(r#"{"do_convert_rgb": false}"#, "do_convert_rgb");
    assert_invalid(r#"{"do_center_crop": true}"#, "do_center_crop");
    assert_invalid(r#"[1, 2]"#, "(top level)");
}

#[test]
fn config_bad_json_and_missing_file() {
    let error = config_error(r#"{"do_resize": true,"#);
    assert!(
        matches!(error, ConfigError::Json { .. }),
        "expected Json, got {error:?}"
    );
    let path = fixture_dir().join("no_such_config.json");
    let error = ImageProcessorConfig::from_json_file(&path).unwrap_err();
    assert!(
        matches!(error, ConfigError::Read { .. }),
        "expected Read, got {error:?}"
    );
    assert!(
        error.to_string().contains("no_such_config.json"),
        "message does not name the file: {error}"
    );
}

#[test]
fn config_ignores_unknown_keys() {
    let config = ImageProcessorConfig::from_json_str(
        r#"{"image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor", "do_pad": false}"#,
        "test_config.json",
    )
    .expect("unknown keys are ignored");
    assert_eq!(
        config,
        ImageProcessorConfig::default(),
        "missing keys take BlipImageProcessor defaults"
    );
}

#[test]
fn preprocess_rejects_invalid_config() {
    let image = RgbImage::from_raw(2, 2, vec![0; 12]).expect("2x2 image");
    let config = ImageProcessorConfig {
        image_std: vec![1.0, 0.0, 1.0],
        ..ImageProcessorConfig::default()
    };
    let error = preprocess(&image, &config).unwrap_err();
    assert!(
        matches!(
            error,
            ImageError::Config(ConfigError::Invalid {
                field: "image_std",
                ..
            })
        ),
        "got {error:?}"
    );
}
