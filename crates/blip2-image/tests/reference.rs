//! Checks decoding, RGB conversion, EXIF handling, resizing and normalization against the
//! Pillow 13.0 / transformers 5.23 outputs recorded by `scripts/fixture_images.py`.

mod common;

use blip2_image::{
    ImageProcessorConfig, ImageSize, LoadOptions, Resample, load_image, preprocess, resize,
};
use common::{Tensors, assert_f32_close, assert_rgb_equal, fixture_dir, manifest, photo_dir};

/// Tolerance for float32 pixel values against transformers' output.
const PIXEL_TOLERANCE: f32 = 1e-6;

fn case_entry(name: &str) -> serde_json::Value {
    manifest()["cases"]
        .as_array()
        .expect("manifest.json has a `cases` array")
        .iter()
        .find(|case| case["name"] == name)
        .unwrap_or_else(|| {
            panic!("manifest.json has no case {name}; rerun scripts/fixture_images.py")
        })
        .clone()
}

fn small_config() -> ImageProcessorConfig {
    let resize = &manifest()["case_resize"];
    let height = resize["height"].as_u64().expect("case_resize.height") as u32;
    let width = resize["width"].as_u64().expect("case_resize.width") as u32;
    ImageProcessorConfig {
        size: ImageSize::new(height, width),
        ..ImageProcessorConfig::default()
    }
}

/// Decodes one case file and checks the RGB image, its bicubic resize and, where recorded,
/// the processor's pixel values.
fn check_case(name: &str) {
    let entry = case_entry(name);
    let path = fixture_dir().join(entry["file"].as_str().expect("case file"));
    let tensors = Tensors::open("cases.safetensors");

    let image = load_image(&path, &LoadOptions::default()).unwrap_or_else(|e| {
        panic!(
            "{name}: Pillow opened it as mode {}, but decoding failed: {e}",
            entry["pil_mode"]
        )
    });
    let rgb = tensors.u8(&format!("{name}.rgb"));
    assert_rgb_equal(
        &format!("{name} RGB"),
        image.width(),
        image.height(),
        image.as_raw(),
        &rgb,
    );

    let config = small_config();
    let (height, width) = config.output_size().expect("small config has a size");
    let resized =
        resize(&image, width, height, Resample::Bicubic).expect("resize to the case size");
    let expected = tensors.u8(&format!("{name}.resized"));
    assert_rgb_equal(
        &format!("{name} resized"),
        resized.width(),
        resized.height(),
        resized.as_raw(),
        &expected,
    );

    if entry["has_pixel_values"] == true {
        let pixels = preprocess(&image, &config).expect("preprocess");
        let expected = tensors.f32(&format!("{name}.pixel_values"));
        let difference = assert_f32_close(
            &format!("{name} pixel values"),
            &pixels.shape,
            &pixels.data,
            &expected,
            PIXEL_TOLERANCE,
        );
        eprintln!(
            "{name}: largest pixel value difference from BlipImageProcessorPil: {difference:e}"
        );
    }
}

macro_rules! case_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check_case(stringify!($name));
            }
        )*

        #[test]
        fn every_manifest_case_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for case in manifest()["cases"].as_array().expect("cases") {
                let name = case["name"].as_str().expect("case name");
                assert!(tested.contains(&name), "manifest case {name} has no test in reference.rs");
            }
        }
    };
}

case_tests!(
    png_rgb,
    png_rgba,
    png_la,
    png_l,
    png_1bit,
    png_p,
    png_p_trns_index,
    png_p_trns_alpha,
    png_rgb_trns,
    png_l_trns,
    png_i16,
    png_i16_trns,
    png_rgb16,
    png_rgb16_trns,
    png_rgb16_trns_low,
    png_gray2_trns,
    png_rgba16,
    png_la16,
    png_exif6,
    jpeg_baseline,
    jpeg_444,
    jpeg_progressive,
    jpeg_gray,
    jpeg_cmyk,
    jpeg_exif1,
    jpeg_exif2,
    jpeg_exif3,
    jpeg_exif4,
    jpeg_exif5,
    jpeg_exif6,
    jpeg_exif7,
    jpeg_exif8,
    webp_lossless,
    webp_lossless_alpha,
    webp_lossy,
    webp_lossy_alpha,
    gif,
    gif_trns,
    gif_animated,
    bmp_rgb,
    bmp_rgba32,
    bmp_l,
    bmp_p,
    tiff_rgb,
    tiff_rgba_lzw,
    tiff_l_deflate,
    tiff_cmyk,
);

#[test]
fn exif_orientation_off_keeps_stored_pixels() {
    let options = LoadOptions {
        apply_exif_orientation: false,
        ..LoadOptions::default()
    };
    let tensors = Tensors::open("cases.safetensors");
    for name in ["jpeg_exif6", "png_exif6"] {
        let entry = case_entry(name);
        let path = fixture_dir().join(entry["file"].as_str().expect("case file"));
        let image = load_image(&path, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = tensors.u8(&format!("{name}.rgb_raw"));
        assert_rgb_equal(
            &format!("{name} without EXIF rotation"),
            image.width(),
            image.height(),
            image.as_raw(),
            &expected,
        );
    }
}

#[test]
fn resize_matches_pil_for_every_filter() {
    let manifest = manifest();
    let source = load_image(
        fixture_dir().join("inputs/resize_source.png"),
        &LoadOptions::default(),
    )
    .expect("resize source");
    let tensors = Tensors::open("resize.safetensors");
    let filters = manifest["resize_filters"]
        .as_object()
        .expect("resize_filters");
    let targets = manifest["resize_targets"]
        .as_array()
        .expect("resize_targets");
    assert_eq!(
        filters.len(),
        6,
        "the fixture should cover all six PIL filters"
    );

    for (filter_name, id) in filters {
        let id = id.as_i64().expect("filter id");
        let filter =
            Resample::from_pil_id(id).unwrap_or_else(|| panic!("unknown PIL filter id {id}"));
        for target in targets {
            let width = target["width"].as_u64().expect("width") as u32;
            let height = target["height"].as_u64().expect("height") as u32;
            let resized = resize(&source, width, height, filter).expect("resize");
            let expected = tensors.u8(&format!("{filter_name}.{width}x{height}"));
            assert_rgb_equal(
                &format!(
                    "{filter} resize {}x{} -> {width}x{height}",
                    source.width(),
                    source.height()
                ),
                resized.width(),
                resized.height(),
                resized.as_raw(),
                &expected,
            );
        }
    }
}

#[test]
fn full_size_photo_matches_blip_processor() {
    let config =
        ImageProcessorConfig::from_json_file(fixture_dir().join("preprocessor_config.json"))
            .expect("config");
    let image =
        load_image(photo_dir().join("chelsea.png"), &LoadOptions::default()).expect("chelsea.png");
    let pixels = preprocess(&image, &config).expect("preprocess");
    let expected = Tensors::open("full.safetensors").f32("chelsea.pixel_values.224");
    let difference = assert_f32_close(
        "chelsea.png at 224x224",
        &pixels.shape,
        &pixels.data,
        &expected,
        PIXEL_TOLERANCE,
    );
    eprintln!(
        "chelsea.png: largest pixel value difference from BlipImageProcessorPil: {difference:e}"
    );
}

#[test]
fn full_size_jpeg_resize_matches_pil() {
    let tensors = Tensors::open("full.safetensors");
    for entry in manifest()["full_resizes"].as_array().expect("full_resizes") {
        let file = entry["file"].as_str().expect("file");
        let side = entry["size"].as_u64().expect("size") as u32;
        let path = photo_dir().join(file.trim_start_matches("images/"));
        let image =
            load_image(&path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let resized = resize(&image, side, side, Resample::Bicubic).expect("resize");
        let stem = file
            .trim_start_matches("images/")
            .split('.')
            .next()
            .expect("file stem");
        let expected = tensors.u8(&format!("{stem}.resized.{side}"));
        assert_rgb_equal(
            &format!("{file} at {side}x{side}"),
            resized.width(),
            resized.height(),
            resized.as_raw(),
            &expected,
        );
    }
}

#[test]
fn config_files_match_transformers_settings() {
    let flat = ImageProcessorConfig::from_json_file(fixture_dir().join("preprocessor_config.json"))
        .expect("flat config");
    let nested = ImageProcessorConfig::from_json_file(fixture_dir().join("processor_config.json"))
        .expect("nested config");
    assert_eq!(
        nested.num_query_tokens,
        Some(32),
        "num_query_tokens from processor_config.json"
    );
    assert_eq!(
        flat.num_query_tokens, None,
        "a flat preprocessor_config.json has no num_query_tokens"
    );
    assert_eq!(
        ImageProcessorConfig {
            num_query_tokens: None,
            ..nested
        },
        flat,
        "nested and flat settings differ"
    );

    // The fixture has BlipImageProcessorPil's defaults except `size`.
    let defaults = ImageProcessorConfig::default();
    assert_eq!(flat.output_size(), Some((224, 224)), "size in the fixture");
    assert_eq!(
        defaults.output_size(),
        Some((384, 384)),
        "default size of BlipImageProcessor"
    );
    assert_eq!(
        ImageProcessorConfig {
            size: defaults.size,
            ..flat
        },
        defaults,
        "defaults differ from transformers'"
    );
}
