//! A batch gives each item exactly what that item gives alone: images, prompts of
//! different lengths (left padding), greedy and beam search.

mod common;

use blip2::pipeline::{Blip2, LoadOptions};
use common::{model_dir, photo, reference};

#[test]
fn batch_equals_single_runs() {
    for name in [
        "opt-tiny",
        "opt-proj-sharded",
        "opt-postln",
        "flan-t5-tiny",
        "t5-relu-tied",
    ] {
        let blip2 = Blip2::from_dir(&model_dir(name), &LoadOptions::default()).unwrap();
        let meta = reference(name);
        let images: Vec<_> = meta
            .photos
            .iter()
            .map(|p| blip2::image::load_image(photo(p), &Default::default()).unwrap())
            .collect();
        let prompts = [
            "",
            "a photo of",
            "Question: what is the cat lying on? Answer:",
            "an",
            "",
        ];
        for num_beams in [1, 3] {
            let mut options = blip2.default_generation_options();
            options.max_new_tokens = 7;
            options.num_beams = num_beams;
            let pixels = blip2.pixel_values(&images).unwrap();
            let batched = blip2.generate(&pixels, &prompts, &options).unwrap();
            for (i, image) in images.iter().enumerate() {
                let alone = blip2
                    .generate(
                        &blip2.pixel_values(std::slice::from_ref(image)).unwrap(),
                        &prompts[i..=i],
                        &options,
                    )
                    .unwrap();
                let alone_tokens: Vec<_> = alone[0].iter().map(|c| &c.token_ids).collect();
                let batch_tokens: Vec<_> = batched[i].iter().map(|c| &c.token_ids).collect();
                assert_eq!(
                    batch_tokens, alone_tokens,
                    "{name}, {num_beams} beams, image {i}: batch differs from single"
                );
            }
        }
    }
}
