//! Quantized language models: saving and reading the quantized layers, refusing files
//! that do not fit, and measuring the quality cost against float32.

mod common;

use blip2::lm::QuantKind;
use blip2::pipeline::{Blip2, LoadOptions};
use common::{max_difference, model_dir, photo};

fn photos() -> Vec<blip2::image::RgbImage> {
    ["chelsea.png", "rocket.jpg"]
        .iter()
        .map(|p| blip2::image::load_image(photo(p), &Default::default()).unwrap())
        .collect()
}

fn load(name: &str, options: LoadOptions) -> Blip2 {
    Blip2::from_dir(&model_dir(name), &options).unwrap()
}

/// Returns the error of loading checkpoint `name` with the quantized layers in `file`.
fn load_error(name: &str, file: std::path::PathBuf) -> String {
    match Blip2::from_dir(
        &model_dir(name),
        &LoadOptions {
            quantized_weights: Some(file),
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("{name} loaded with a file it should reject"),
        Err(error) => error.to_string(),
    }
}

fn quantized(kind: QuantKind) -> LoadOptions {
    LoadOptions {
        quantize: Some(kind),
        ..Default::default()
    }
}

#[test]
fn saved_layers_load_back_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["opt-tiny", "flan-t5-tiny"] {
        for kind in [QuantKind::Q8, QuantKind::Q4] {
            let mut at_load = load(name, quantized(kind));
            let file = dir
                .path()
                .join(format!("{name}.{}.safetensors", kind.name()));
            let layers = at_load.save_quantized_language_model(&file).unwrap();
            assert!(layers > 0, "{name}: no layer saved");

            let from_file = load(
                name,
                LoadOptions {
                    quantized_weights: Some(file.clone()),
                    ..Default::default()
                },
            );
            let pixels = at_load.pixel_values(&photos()).unwrap();
            let features = at_load.encode_images(&pixels).unwrap();
            let expected = at_load.first_token_logits(&features, &[]).unwrap();
            let actual = from_file.first_token_logits(&features, &[]).unwrap();
            let (difference, ..) = max_difference(&actual, &expected);
            assert_eq!(
                difference, 0.0,
                "{name} {kind:?}: logits differ after reloading"
            );

            // A file of one model does not fit another.
            let other = if name == "opt-tiny" {
                "flan-t5-tiny"
            } else {
                "opt-tiny"
            };
            let error = load_error(other, file.clone());
            assert!(
                error.contains(&file.display().to_string()) && error.contains("this checkpoint"),
                "{other} reading {name}'s layers: {error}"
            );
        }
    }
}

#[test]
fn files_that_are_not_quantized_layers_are_refused() {
    let weights = model_dir("opt-tiny").join("model.safetensors");
    let error = load_error("opt-tiny", weights);
    assert!(error.contains("not a file of quantized layers"), "{error}");

    let both = LoadOptions {
        quantize: Some(QuantKind::Q8),
        quantized_weights: Some("unused.safetensors".into()),
        ..Default::default()
    };
    let error = Blip2::from_dir(&model_dir("opt-tiny"), &both)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("not both"), "{error}");

    assert!(!blip2::pipeline::is_quantized_file(
        &model_dir("opt-tiny").join("model.safetensors")
    ));

    let mut float = load("opt-tiny", LoadOptions::default());
    let error = float
        .save_quantized_language_model(&std::env::temp_dir().join("never-written.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("no quantized layer"), "{error}");
}

#[test]
fn non_finite_scales_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    load("opt-tiny", quantized(QuantKind::Q8))
        .save_quantized_language_model(&good)
        .unwrap();
    assert!(blip2::pipeline::is_quantized_file(&good));

    // The same file with one scale replaced by NaN.
    let bytes = std::fs::read(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    let (name, _, _, scales) = data
        .iter_mut()
        .find(|(name, ..)| name.ends_with(".scales"))
        .unwrap();
    let name = name.clone();
    scales[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let views = data.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.clone(),
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    let bad = dir.path().join("bad.safetensors");
    safetensors::serialize_to_file(views, header.metadata().clone(), &bad).unwrap();

    let error = load_error("opt-tiny", bad);
    assert!(error.contains(&name), "{error}");
    assert!(error.contains("finite"), "{error}");
}

#[test]
fn quality_cost_grows_as_codes_get_narrower() {
    let positions = 12;
    let reference = load("opt-tiny", LoadOptions::default());
    let same = reference
        .compare_language_models(&reference, &photos(), positions)
        .unwrap();
    assert_eq!(same.positions, 2 * positions);
    assert_eq!(same.same_top_token, same.positions);
    assert_eq!(same.max_abs_error, 0.0);

    let q8 = reference
        .compare_language_models(
            &load("opt-tiny", quantized(QuantKind::Q8)),
            &photos(),
            positions,
        )
        .unwrap();
    let q4 = reference
        .compare_language_models(
            &load("opt-tiny", quantized(QuantKind::Q4)),
            &photos(),
            positions,
        )
        .unwrap();
    assert_eq!(q8.positions, 2 * positions);
    assert!(q8.max_abs_error > 0.0, "q8 changed no logit");
    assert!(
        q8.mean_abs_error() < q4.mean_abs_error(),
        "q8 mean error {} is not below q4's {}",
        q8.mean_abs_error(),
        q4.mean_abs_error()
    );
    // 8-bit blocks keep errors small against logits that span about ±13 here.
    assert!(q8.max_abs_error < 0.05 * q8.max_abs_logit, "{q8:?}");
}

#[test]
fn int8_vision_and_prompts_stay_close() {
    let positions = 12;
    let reference = load("opt-tiny", LoadOptions::default());
    let int8 = |vision_int8, prompt_int8| {
        load(
            "opt-tiny",
            LoadOptions {
                vision_int8,
                prompt_int8,
                ..Default::default()
            },
        )
    };

    // The vision encoder's 17 tokens go through the 8-bit products.
    let vision = int8(true, false);
    let pixels = reference.pixel_values(&photos()).unwrap();
    let encode = |model: &Blip2| model.model().vision_encoder().encode(&pixels).unwrap();
    let (expected, actual) = (encode(&reference), encode(&vision));
    let (difference, ..) = max_difference(&actual, &expected);
    let largest = expected.abs().unwrap().max_all().unwrap();
    let largest = largest.to_scalar::<f32>().unwrap();
    println!("vision: max difference {difference} against features up to {largest}");
    assert!(difference > 0.0, "the 8-bit vision encoder changed nothing");
    assert!(
        difference < 0.05 * largest,
        "{difference} against {largest}"
    );

    // The prompt (8 queries and BOS) takes the 8-bit copies; decoding keeps float32.
    for (name, candidate) in [("prompts", int8(false, true)), ("both", int8(true, true))] {
        let measured = reference
            .compare_language_models(&candidate, &photos(), positions)
            .unwrap();
        println!("{name}: {measured:?}");
        assert_eq!(measured.positions, 2 * positions);
        assert!(measured.max_abs_error > 0.0, "{name}: no logit changed");
        assert!(
            measured.max_abs_error < 0.05 * measured.max_abs_logit,
            "{name}: {measured:?}"
        );
    }
}

#[test]
fn stray_scales_of_a_dense_layer_are_rejected() {
    // opt-proj-sharded keeps every layer dense (no input width is a multiple of 32), so a
    // file with scales for one of its layers, and no codes, contains a tensor of no layer.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    load("opt-tiny", quantized(QuantKind::Q8))
        .save_quantized_language_model(&good)
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let scales = vec![0u8; 4];
    let name = "model.decoder.layers.0.fc1.scales";
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 1], &scales).unwrap();
    let stray = dir.path().join("stray.safetensors");
    safetensors::serialize_to_file([(name, view)], header.metadata().clone(), &stray).unwrap();

    let error = load_error("opt-proj-sharded", stray);
    assert!(error.contains(name), "{error}");
    assert!(error.contains("belongs to no layer"), "{error}");
}
