//! `low_memory` drops the image side's weight pages as it goes. The next image reads
//! them back from the file cache, so it must get exactly the same results.

mod common;

use blip2::pipeline::{Blip2, LoadOptions};
use common::{model_dir, photo, reference};

#[test]
fn low_memory_captions_match_default() {
    for name in ["opt-tiny", "flan-t5-tiny"] {
        let normal = Blip2::from_dir(&model_dir(name), &LoadOptions::default()).unwrap();
        let low_memory = Blip2::from_dir(
            &model_dir(name),
            &LoadOptions {
                low_memory: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let mut options = normal.default_generation_options();
        options.max_new_tokens = 6;
        for photo_name in reference(name).photos.iter().chain(&reference(name).photos) {
            let image = blip2::image::load_image(photo(photo_name), &Default::default()).unwrap();
            let pixels = normal.pixel_values(std::slice::from_ref(&image)).unwrap();
            let expected = normal.generate(&pixels, &[""], &options).unwrap();
            let got = low_memory.generate(&pixels, &[""], &options).unwrap();
            assert_eq!(
                got[0][0].token_ids, expected[0][0].token_ids,
                "{name}, {photo_name}: low-memory caption differs"
            );
        }
    }
}
