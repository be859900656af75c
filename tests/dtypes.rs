//! bf16 and f16 runs stay finite and close to f32 on the fixture checkpoints.

mod common;

use blip2::pipeline::{Blip2, LoadOptions};
use candle_core::DType;
use common::{max_difference, model_dir, photo, reference};

/// Bound on the first-token logit difference against f32 (logits have a spread of
/// about 3 on these fixtures). Measured on x86-64 CPUs over the fixtures and five
/// photos: at most 0.090 in bf16 (0.077 without AVX-512 BF16, whose products round
/// differently) and 0.012 in f16. The bounds leave about twice that.
const LOGIT_TOLERANCE: [(DType, f32); 2] = [(DType::BF16, 0.15), (DType::F16, 0.025)];

#[test]
fn half_precision_stays_close_to_f32() {
    for name in [
        "opt-tiny",
        "opt-postln",
        "opt-proj-sharded",
        "flan-t5-tiny",
        "t5-relu-tied",
    ] {
        let meta = reference(name);
        let full = Blip2::from_dir(&model_dir(name), &LoadOptions::default()).unwrap();
        let images: Vec<_> = meta
            .photos
            .iter()
            .map(|p| blip2::image::load_image(photo(p), &Default::default()).unwrap())
            .collect();
        let pixels = full.pixel_values(&images).unwrap();
        let features = full.encode_images(&pixels).unwrap();
        let expected = full.first_token_logits(&features, &[]).unwrap();

        for (dtype, tolerance) in LOGIT_TOLERANCE {
            let half = Blip2::from_dir(
                &model_dir(name),
                &LoadOptions {
                    dtype,
                    ..Default::default()
                },
            )
            .unwrap();
            let half_features = half.encode_images(&pixels).unwrap();
            assert_eq!(
                half_features.vision.dtype(),
                dtype,
                "{name}: vision output dtype"
            );
            assert_eq!(
                half_features.queries.dtype(),
                DType::F32,
                "{name}: the Q-Former stays in f32"
            );
            let logits = half.first_token_logits(&half_features, &[]).unwrap();
            let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{name} {dtype:?}: non-finite logits"
            );
            let (difference, index, a, e) = max_difference(&logits, &expected);
            println!("{name} {dtype:?}: max logit difference {difference:.4} at {index:?}");
            assert!(
                difference <= tolerance,
                "{name} {dtype:?}: logits differ by {difference} > {tolerance} at {index:?} ({a} vs {e})"
            );
        }
    }
}
