//! Image-text retrieval checkpoints against transformers' `Blip2ForImageTextRetrieval`:
//! embeddings, contrastive similarity (ITC) and matching probability (ITM).

mod common;

use blip2::pipeline::{Blip2, LoadOptions, contrastive_similarity};
use candle_core::Tensor;
use common::{assert_close, fixtures, model_dir, photo, reference_tensors};
use serde::Deserialize;

#[derive(Deserialize)]
struct Ranking {
    text: String,
    itc: Vec<usize>,
    rerank: Vec<usize>,
}

#[derive(Deserialize)]
struct RetrievalReference {
    photos: Vec<String>,
    texts: Vec<String>,
    text_ids: Vec<Vec<u32>>,
    rankings: Vec<Ranking>,
}

fn retrieval_reference(name: &str) -> RetrievalReference {
    let path = fixtures().join("reference").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

const MODELS: [&str; 2] = ["itm-tiny", "itm-wide"];

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
fn embeddings_and_scores_match_reference() {
    for name in MODELS {
        let blip2 = load(name);
        let meta = retrieval_reference(name);
        let expected = reference_tensors(name);
        let texts: Vec<&str> = meta.texts.iter().map(String::as_str).collect();

        for (text, ids) in texts.iter().zip(&meta.text_ids) {
            assert_eq!(
                &blip2.tokenizer().encode(text).unwrap(),
                ids,
                "{name}: token ids of {text:?}"
            );
        }
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

        let image_embeds = blip2.image_embeds(&features).unwrap();
        let text_embeds = blip2.text_embeds(&texts).unwrap();
        assert_close(
            &format!("{name} image_embeds"),
            &image_embeds,
            &expected["image_embeds"],
            1e-4,
        );
        assert_close(
            &format!("{name} text_embeds"),
            &text_embeds,
            &expected["text_embeds"],
            1e-4,
        );
        let itc = contrastive_similarity(&image_embeds, &text_embeds).unwrap();
        assert_close(
            &format!("{name} ITC"),
            &itc,
            &expected["itc_similarity"],
            1e-5,
        );

        let logits = blip2.matching_logits(&features, &texts).unwrap();
        assert_close(
            &format!("{name} ITM logits"),
            &logits,
            &expected["itm_logits"],
            1e-4,
        );
        let probability = candle_nn::ops::softmax_last_dim(&logits)
            .unwrap()
            .narrow(2, 1, 1)
            .unwrap()
            .squeeze(2)
            .unwrap();
        assert_close(
            &format!("{name} ITM probability"),
            &probability,
            &expected["itm_probability"],
            1e-5,
        );
    }
}

#[test]
fn batches_equal_single_items() {
    let blip2 = load("itm-tiny");
    let meta = retrieval_reference("itm-tiny");
    let texts: Vec<&str> = meta.texts.iter().map(String::as_str).collect();
    let batched = blip2.text_embeds(&texts).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let alone = blip2.text_embeds(&[text]).unwrap();
        assert_close(
            &format!("text {i} alone vs batched"),
            &alone,
            &batched.narrow(0, i, 1).unwrap(),
            1e-6,
        );
    }
    let pixels = photos(&blip2, &meta.photos);
    let features = blip2.encode_images(&pixels).unwrap();
    let all = blip2.matching_logits(&features, &texts).unwrap();
    for image in 0..meta.photos.len() {
        let single = blip2
            .encode_images(&pixels.narrow(0, image, 1).unwrap())
            .unwrap();
        for (t, text) in texts.iter().enumerate() {
            let one = blip2.matching_logits(&single, &[text]).unwrap();
            let expected = all.narrow(0, image, 1).unwrap().narrow(1, t, 1).unwrap();
            assert_close(
                &format!("ITM image {image} text {t} alone vs batched"),
                &one,
                &expected,
                1e-5,
            );
        }
    }
}

#[test]
fn match_scores_rank_like_reference() {
    let blip2 = load("itm-wide");
    let meta = retrieval_reference("itm-wide");
    let expected = reference_tensors("itm-wide");
    let image = blip2::image::load_image(photo(&meta.photos[2]), &Default::default()).unwrap();
    let texts: Vec<&str> = meta.texts.iter().map(String::as_str).collect();
    let scores = blip2.match_texts(&image, &texts).unwrap();
    let probability = expected["itm_probability"]
        .get(2)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let similarity = expected["itc_similarity"]
        .get(2)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (t, score) in scores.iter().enumerate() {
        assert_eq!(score.text, texts[t]);
        assert!(
            (score.itm_probability - probability[t]).abs() < 1e-5,
            "ITM {t}: {} vs {}",
            score.itm_probability,
            probability[t]
        );
        assert!(
            (score.itc_similarity - similarity[t]).abs() < 1e-5,
            "ITC {t}: {} vs {}",
            score.itc_similarity,
            similarity[t]
        );
        assert!((0.0..=1.0).contains(&score.itm_probability));
        assert!((-1.0..=1.0).contains(&score.itc_similarity));
    }
    assert!(
        !meta.rankings.is_empty()
            && meta
                .rankings
                .iter()
                .all(|r| r.itc.len() == meta.photos.len()
                    && r.rerank.len() == meta.photos.len()
                    && !r.text.is_empty())
    );
}

#[test]
fn captioning_checkpoint_has_no_projections_but_gives_qformer_features() {
    let blip2 = load("opt-tiny");
    let image = blip2::image::load_image(photo("chelsea.png"), &Default::default()).unwrap();
    let pixels = blip2.pixel_values(&[image]).unwrap();
    let features = blip2.encode_images(&pixels).unwrap();
    assert_eq!(features.queries.dims(), &[1, 8, 32]);
    for message in [
        blip2.image_embeds(&features).unwrap_err().to_string(),
        blip2.text_embeds(&["a cat"]).unwrap_err().to_string(),
    ] {
        assert!(message.contains("no projection heads"), "{message}");
        assert!(message.contains("retrieval checkpoint"), "{message}");
    }
}

#[test]
fn retrieval_checkpoint_cannot_caption_and_rejects_bad_texts() {
    let blip2 = load("itm-tiny");
    let image = blip2::image::load_image(photo("chelsea.png"), &Default::default()).unwrap();
    let error = blip2
        .caption(&image, None, &blip2.default_generation_options())
        .unwrap_err();
    assert!(
        error.to_string().contains("without a language model"),
        "{error}"
    );
    assert!(
        blip2
            .text_embeds(&[])
            .unwrap_err()
            .to_string()
            .contains("no texts")
    );
    let long = "cat ".repeat(100);
    let message = blip2.text_embeds(&[&long]).unwrap_err().to_string();
    assert!(message.contains("reads at most"), "{message}");
}
