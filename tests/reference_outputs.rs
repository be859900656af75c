//! The fixture checkpoints (OPT and T5 language models) against transformers 5.23:
//! every stage's output and every recorded `generate` call (greedy, beam search,
//! penalties, batches).

mod common;

use blip2::pipeline::{Blip2, EarlyStopping, GenerationOptions, LoadOptions};
use candle_core::Tensor;
use common::{assert_close, model_dir, photo, reference, reference_tensors};

const MODELS: [&str; 5] = [
    "opt-tiny",
    "opt-proj-sharded",
    "opt-postln",
    "flan-t5-tiny",
    "t5-relu-tied",
];

fn load(name: &str) -> Blip2 {
    Blip2::from_dir(&model_dir(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn photos(blip2: &Blip2, names: &[String]) -> Tensor {
    let images: Vec<_> = names
        .iter()
        .map(|n| blip2::image::load_image(photo(n), &Default::default()).unwrap())
        .collect();
    blip2.pixel_values(&images).unwrap()
}

#[test]
fn stages_match_reference() {
    for name in MODELS {
        let blip2 = load(name);
        let expected = reference_tensors(name);
        let meta = reference(name);

        let pixels = photos(&blip2, &meta.photos);
        assert_close(
            &format!("{name} pixel_values"),
            &pixels,
            &expected["pixel_values"],
            1e-6,
        );

        let features = blip2.encode_images(&pixels).unwrap();
        assert_close(
            &format!("{name} vision"),
            &features.vision,
            &expected["vision_last_hidden_state"],
            1e-4,
        );
        assert_close(
            &format!("{name} qformer"),
            &features.queries,
            &expected["qformer_last_hidden_state"],
            1e-4,
        );
        assert_close(
            &format!("{name} projection"),
            features.projection.as_ref().unwrap(),
            &expected["language_projection"],
            1e-4,
        );

        for (index, prompt) in meta.logits_prompts.iter().enumerate() {
            let prompts = vec![prompt.as_str(); meta.photos.len()];
            let logits = blip2.first_token_logits(&features, &prompts).unwrap();
            let key = format!("first_logits_prompt{index}");
            assert_close(&format!("{name} {key}"), &logits, &expected[&key], 1e-4);
        }
    }
}

#[test]
fn position_embeddings_interpolate_like_reference() {
    for name in MODELS {
        let blip2 = load(name);
        let expected = reference_tensors(name);
        let features = blip2
            .encode_images(&expected["interpolated_pixel_values"])
            .unwrap();
        assert_close(
            &format!("{name} interpolated vision"),
            &features.vision,
            &expected["interpolated_vision_last_hidden_state"],
            1e-4,
        );
    }
}

fn options_for(
    blip2: &Blip2,
    settings: &serde_json::Map<String, serde_json::Value>,
) -> GenerationOptions {
    let mut options = blip2.default_generation_options();
    for (key, value) in settings {
        let as_usize = || value.as_u64().unwrap() as usize;
        let as_f32 = || value.as_f64().unwrap() as f32;
        match key.as_str() {
            "max_new_tokens" => options.max_new_tokens = as_usize(),
            "min_new_tokens" => options.min_new_tokens = as_usize(),
            "num_beams" => options.num_beams = as_usize(),
            "num_return_sequences" => options.num_return_sequences = as_usize(),
            "length_penalty" => options.length_penalty = as_f32(),
            "repetition_penalty" => options.repetition_penalty = as_f32(),
            "no_repeat_ngram_size" => options.no_repeat_ngram_size = as_usize(),
            "early_stopping" => {
                options.early_stopping = match value {
                    serde_json::Value::Bool(true) => EarlyStopping::Always,
                    serde_json::Value::Bool(false) => EarlyStopping::Heuristic,
                    _ => EarlyStopping::Never,
                }
            }
            other => panic!("the test does not know generation setting {other}"),
        }
    }
    options
}

#[test]
fn generation_matches_reference() {
    for name in MODELS {
        let blip2 = load(name);
        let meta = reference(name);
        let pixels = photos(&blip2, &meta.photos);
        let features_all = blip2.encode_images(&pixels).unwrap();
        assert_eq!(
            blip2.default_generation_options().eos_token_ids,
            meta.eos_token_ids,
            "{name}: eos ids"
        );

        for case in &meta.cases {
            let index = Tensor::new(
                case.images.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let pixels = pixels.index_select(&index, 0).unwrap();
            let prompts: Vec<&str> = case.prompts.iter().map(String::as_str).collect();
            let options = options_for(&blip2, &case.settings);

            // Tokenization of the non-empty prompts (empty ones start from BOS for OPT).
            for (item, prompt) in prompts.iter().enumerate() {
                if prompt.is_empty() {
                    continue;
                }
                let ids = blip2.tokenizer().encode(prompt).unwrap();
                assert_eq!(
                    ids, case.prompt_ids[item],
                    "{name}/{}: prompt ids of item {item}",
                    case.name
                );
            }

            let results = blip2.generate(&pixels, &prompts, &options).unwrap();
            for (item, sequences) in results.iter().enumerate() {
                let tokens: Vec<Vec<u32>> = sequences.iter().map(|c| c.token_ids.clone()).collect();
                assert_eq!(
                    tokens, case.tokens[item],
                    "{name}/{}: tokens of item {item}",
                    case.name
                );
                let texts: Vec<String> = sequences.iter().map(|c| c.text.clone()).collect();
                let expected_texts: Vec<String> = case.texts[item]
                    .iter()
                    .map(|t| t.trim().to_string())
                    .collect();
                assert_eq!(
                    texts, expected_texts,
                    "{name}/{}: texts of item {item}",
                    case.name
                );
                if let Some(scores) = &case.scores {
                    for (rank, caption) in sequences.iter().enumerate() {
                        let score = caption.score.expect("beam search returns scores");
                        let expected = scores[item][rank];
                        assert!(
                            (score - expected).abs() < 1e-4,
                            "{name}/{}: beam score of item {item} rank {rank}: {score} vs {expected}",
                            case.name
                        );
                    }
                }
            }
        }
        drop(features_all);
    }
}
