//! Question answering, conversations, sampling and streaming on the fixture checkpoints.

mod common;

use blip2::pipeline::{Blip2, Conversation, LoadOptions, QuestionTemplate};
use common::{model_dir, photo, reference};

fn load(name: &str) -> Blip2 {
    Blip2::from_dir(&model_dir(name), &LoadOptions::default()).unwrap()
}

fn chelsea() -> blip2::image::RgbImage {
    blip2::image::load_image(photo("chelsea.png"), &Default::default()).unwrap()
}

#[test]
fn questions_use_the_template_and_match_reference() {
    for name in ["opt-tiny", "opt-proj-sharded", "flan-t5-tiny"] {
        let blip2 = load(name);
        let meta = reference(name);
        let case = meta
            .cases
            .iter()
            .find(|c| c.name == "greedy_question")
            .unwrap();
        assert_eq!(
            case.prompts[0],
            "Question: what is the cat lying on? Answer:"
        );
        let mut options = blip2.default_generation_options();
        options.max_new_tokens = case.settings["max_new_tokens"].as_u64().unwrap() as usize;

        let answer = blip2
            .ask(&chelsea(), "what is the cat lying on?", &options)
            .unwrap();
        assert_eq!(answer.prompt, case.prompts[0], "{name}: prompt");
        assert_eq!(answer.token_ids, case.tokens[0][0], "{name}: answer tokens");
        assert_eq!(answer.text, case.texts[0][0].trim(), "{name}: answer text");
    }
}

#[test]
fn conversation_folds_turns_and_encodes_once() {
    let blip2 = load("flan-t5-tiny");
    let mut options = blip2.default_generation_options();
    options.max_new_tokens = 5;
    let before = blip2.model().images_encoded();
    let mut conversation = Conversation::new(&blip2, &chelsea()).unwrap();
    let first = conversation.ask("what is this?", &options, None).unwrap();
    let second = conversation
        .ask("  and the color?  ", &options, None)
        .unwrap();
    assert_eq!(first.prompt, "Question: what is this? Answer:");
    assert_eq!(
        second.prompt,
        format!(
            "Question: what is this? Answer: {}. Question: and the color? Answer:",
            first.text
        )
    );
    assert_eq!(conversation.turns().len(), 2);
    conversation.ask("third?", &options, None).unwrap();
    assert_eq!(
        blip2.model().images_encoded() - before,
        1,
        "the image is encoded once per conversation"
    );

    conversation.reset();
    let fresh = conversation.ask("what is this?", &options, None).unwrap();
    assert_eq!(
        fresh.token_ids, first.token_ids,
        "after a reset the first question is answered as before"
    );
}

#[test]
fn empty_question_and_bad_template_are_rejected() {
    let blip2 = load("opt-tiny");
    let options = blip2.default_generation_options();
    let mut conversation = Conversation::new(&blip2, &chelsea()).unwrap();
    let error = conversation.ask("   ", &options, None).unwrap_err();
    assert!(error.to_string().contains("empty"), "{error}");
    assert!(conversation.turns().is_empty());
    assert!(QuestionTemplate::new("no placeholder").is_err());
    assert!(QuestionTemplate::new("{} and {}").is_err());
    assert_eq!(
        QuestionTemplate::new("Q: {} A:").unwrap().fill("why"),
        "Q: why A:"
    );
}

#[test]
fn long_history_drops_oldest_turns_and_overlong_question_fails() {
    // opt-tiny has 64 positions: 8 queries, the prompt and the new tokens must fit.
    let blip2 = load("opt-tiny");
    let mut options = blip2.default_generation_options();
    options.max_new_tokens = 4;
    let mut conversation = Conversation::new(&blip2, &chelsea()).unwrap();
    let mut dropped = 0;
    for turn in 0..8 {
        let answer = conversation
            .ask(
                &format!("is the cat lying on a red blanket number {turn}?"),
                &options,
                None,
            )
            .unwrap();
        dropped = dropped.max(answer.dropped_turns);
    }
    assert!(
        dropped > 0,
        "a long history must drop turns to fit 64 positions"
    );

    let turns_before = conversation.turns().len();
    let overlong = "a photo of a cat ".repeat(30);
    let error = conversation.ask(&overlong, &options, None).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("positions"), "{message}");
    assert_eq!(
        conversation.turns().len(),
        turns_before,
        "a failed question is not recorded"
    );
}

#[test]
fn sampling_distribution_matches_reference_warpers() {
    for name in ["opt-tiny", "flan-t5-tiny"] {
        let blip2 = load(name);
        let meta = reference(name);
        let expected = common::reference_tensors(name);
        let logits = expected["first_logits_prompt0"]
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for case in &meta.sampling {
            let mut options = blip2.default_generation_options();
            options.do_sample = true;
            options.temperature = case.settings.temperature;
            options.top_k = case.settings.top_k;
            options.top_p = case.settings.top_p;
            let distribution =
                blip2::lm::generation::next_token_distribution(&options, &[], 0, &logits);
            let kept: Vec<usize> = (0..distribution.len())
                .filter(|&i| distribution[i] > 0.0)
                .collect();
            let mut expected_kept: Vec<usize> = case
                .probabilities
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            expected_kept.sort();
            assert_eq!(
                kept, expected_kept,
                "{name} {:?}: tokens kept",
                case.settings
            );
            for (token, &p) in &case.probabilities {
                let got = distribution[token.parse::<usize>().unwrap()];
                assert!(
                    (got - p).abs() < 1e-5,
                    "{name} {:?}: p(token {token}) = {got}, reference {p}",
                    case.settings
                );
            }
        }
    }
}

#[test]
fn sampled_first_tokens_follow_the_distribution() {
    let blip2 = load("opt-tiny");
    let meta = reference("opt-tiny");
    let case = &meta.sampling[0]; // top-k 5
    let pixels = blip2.pixel_values(&[chelsea()]).unwrap();
    let mut options = blip2.default_generation_options();
    options.do_sample = true;
    options.top_k = case.settings.top_k;
    options.top_p = case.settings.top_p;
    options.temperature = case.settings.temperature;
    options.max_new_tokens = 1;
    options.num_return_sequences = 4000;
    options.eos_token_ids.clear();
    let samples = blip2.generate(&pixels, &[], &options).unwrap().remove(0);
    let mut counts = std::collections::HashMap::new();
    for sample in &samples {
        *counts
            .entry(sample.token_ids[0].to_string())
            .or_insert(0usize) += 1;
    }
    for token in counts.keys() {
        assert!(
            case.probabilities.contains_key(token),
            "sampled token {token} outside the top-k set"
        );
    }
    for (token, &p) in &case.probabilities {
        let frequency = counts.get(token).copied().unwrap_or(0) as f32 / samples.len() as f32;
        // Four standard deviations of a binomial frequency over 4000 draws.
        let bound = 4.0 * (p * (1.0 - p) / samples.len() as f32).sqrt() + 1e-3;
        assert!(
            (frequency - p).abs() < bound,
            "token {token}: frequency {frequency}, probability {p}"
        );
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let blip2 = load("flan-t5-tiny");
    let pixels = blip2.pixel_values(&[chelsea()]).unwrap();
    let mut options = blip2.default_generation_options();
    options.max_new_tokens = 10;
    let greedy = blip2.generate(&pixels, &[], &options).unwrap();

    options.do_sample = true;
    options.top_p = 0.9;
    options.seed = 42;
    let first = blip2.generate(&pixels, &[], &options).unwrap();
    let again = blip2.generate(&pixels, &[], &options).unwrap();
    assert_eq!(first, again, "the same seed gives the same text");
    let other_seeds: Vec<_> = (0..5)
        .map(|seed| {
            options.seed = seed;
            blip2.generate(&pixels, &[], &options).unwrap()[0][0]
                .token_ids
                .clone()
        })
        .collect();
    assert!(
        other_seeds.iter().any(|t| *t != first[0][0].token_ids),
        "different seeds should differ somewhere"
    );

    options.top_k = 1;
    options.top_p = 1.0;
    options.temperature = 0.5;
    let top1 = blip2.generate(&pixels, &[], &options).unwrap();
    assert_eq!(
        top1[0][0].token_ids, greedy[0][0].token_ids,
        "top_k=1 sampling equals greedy search"
    );
}

#[test]
fn streamed_pieces_concatenate_to_the_answer() {
    for name in ["opt-tiny", "opt-postln", "flan-t5-tiny"] {
        let blip2 = load(name);
        let mut options = blip2.default_generation_options();
        options.max_new_tokens = 20;
        for num_beams in [1, 2] {
            options.num_beams = num_beams;
            let mut conversation = Conversation::new(&blip2, &chelsea()).unwrap();
            let mut pieces = Vec::new();
            let mut collect = |piece: &str| pieces.push(piece.to_string());
            let answer = conversation
                .ask("what is this?", &options, Some(&mut collect))
                .unwrap();
            assert_eq!(
                pieces.concat(),
                answer.text,
                "{name}, {num_beams} beams: streamed text"
            );
            if num_beams == 1 && answer.text.chars().count() > 3 {
                assert!(
                    pieces.len() > 1,
                    "{name}: greedy answers stream in several pieces"
                );
            }
        }
    }
}
