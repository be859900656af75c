//! Per-stage benchmarks: `cargo bench --bench stages`.
//!
//! - `fixture/*`: the whole pipeline on the `opt-tiny` test checkpoint (preprocessing,
//!   vision encoder, Q-Former, prompt prefill, one decode step, a whole caption).
//! - `real/*`: the stages at the real blip2-opt-2.7b widths with random weights built in
//!   memory: one ViT-g layer (1408 wide, 257 tokens), the Q-Former (12 layers, 768 wide),
//!   and one OPT-2.7B layer plus the 50304-word output layer for a 33-token prefill and a
//!   decode step, in f32, bf16 and with 8- and 4-bit weights. Whole-model times are these
//!   times times the layer counts (39 vision, 32 language layers); the side-by-side script
//!   `scripts/bench_vs_pytorch.py` measures the whole model.

use std::collections::HashMap;
use std::path::PathBuf;

use blip2::lm::{LanguageModel, OptConfig, OptModel, QuantKind};
use blip2::pipeline::{Blip2, LoadOptions};
use blip2::qformer::{QFormer, QFormerConfig};
use blip2::vision::{EvaVisionModel, VisionConfig, VisionEncoder};
use blip2_nn::Weights;
use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(c: &mut Criterion) {
    let blip2 = Blip2::from_dir(
        &repo().join("tests/fixtures/models/opt-tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    let photo = repo().join("images/chelsea.png");
    let image = blip2::image::load_image(&photo, &Default::default()).unwrap();
    let mut options = blip2.default_generation_options();
    options.max_new_tokens = 10;
    options.min_new_tokens = 10;
    let pixels = blip2.pixel_values(std::slice::from_ref(&image)).unwrap();
    let features = blip2.encode_images(&pixels).unwrap();
    let model = blip2.model();

    let mut group = c.benchmark_group("fixture");
    group.bench_function("preprocess", |b| {
        b.iter(|| {
            let image = blip2::image::load_image(&photo, &Default::default()).unwrap();
            blip2.pixel_values(std::slice::from_ref(&image)).unwrap()
        })
    });
    group.bench_function("vision_encoder", |b| {
        b.iter(|| model.vision_encoder().encode(&pixels).unwrap())
    });
    group.bench_function("qformer", |b| {
        b.iter(|| {
            model
                .qformer()
                .query_features(model.query_tokens(), &features.vision)
                .unwrap()
        })
    });
    group.bench_function("prefill", |b| {
        b.iter(|| blip2.first_token_logits(&features, &[]).unwrap())
    });
    let lm = model.language_model().unwrap();
    let inputs = features.language_inputs.clone().unwrap();
    let mask = Tensor::ones((1, inputs.dim(1).unwrap()), DType::U32, &Device::Cpu).unwrap();
    let (mut session, _) = lm.start(&inputs, &mask, 40).unwrap();
    let mut steps = 0;
    group.bench_function("decode_step", |b| {
        b.iter(|| {
            // The fixture model has 64 positions; start over before running out.
            if steps == 20 {
                session = lm.start(&inputs, &mask, 40).unwrap().0;
                steps = 0;
            }
            steps += 1;
            session.step(&[5]).unwrap()
        })
    });
    group.bench_function("caption_10_tokens", |b| {
        b.iter(|| blip2.caption(&image, None, &options).unwrap())
    });
    group.finish();
}

/// Random tensors named as a checkpoint names them, scaled to keep activations finite.
fn random_weights(shapes: &[(String, Vec<usize>)]) -> Weights {
    let device = Device::Cpu;
    let tensors: HashMap<String, Tensor> = shapes
        .iter()
        .map(|(name, shape)| {
            let tensor = if name.ends_with("weight") && shape.len() == 1 {
                Tensor::ones(shape.as_slice(), DType::F32, &device).unwrap()
            } else {
                (Tensor::randn(0f32, 1.0, shape.as_slice(), &device).unwrap() * 0.02).unwrap()
            };
            (name.clone(), tensor)
        })
        .collect();
    Weights::from_var_builder(candle_nn::VarBuilder::from_tensors(
        tensors,
        DType::F32,
        &device,
    ))
}

fn shape(name: String, dims: &[usize]) -> (String, Vec<usize>) {
    (name, dims.to_vec())
}

fn vision_layer_weights(hidden: usize, mlp: usize, positions: usize) -> Vec<(String, Vec<usize>)> {
    let mut shapes = vec![
        shape(
            "embeddings.patch_embedding.weight".into(),
            &[hidden, 3, 14, 14],
        ),
        shape("embeddings.patch_embedding.bias".into(), &[hidden]),
        shape("embeddings.class_embedding".into(), &[1, 1, hidden]),
        shape(
            "embeddings.position_embedding".into(),
            &[1, positions, hidden],
        ),
        shape("post_layernorm.weight".into(), &[hidden]),
        shape("post_layernorm.bias".into(), &[hidden]),
    ];
    let layer = "encoder.layers.0";
    for (name, dims) in [
        ("layer_norm1.weight", vec![hidden]),
        ("layer_norm1.bias", vec![hidden]),
        ("layer_norm2.weight", vec![hidden]),
        ("layer_norm2.bias", vec![hidden]),
        ("self_attn.qkv.weight", vec![3 * hidden, hidden]),
        ("self_attn.qkv.bias", vec![3 * hidden]),
        ("self_attn.projection.weight", vec![hidden, hidden]),
        ("self_attn.projection.bias", vec![hidden]),
        ("mlp.fc1.weight", vec![mlp, hidden]),
        ("mlp.fc1.bias", vec![mlp]),
        ("mlp.fc2.weight", vec![hidden, mlp]),
        ("mlp.fc2.bias", vec![hidden]),
    ] {
        shapes.push(shape(format!("{layer}.{name}"), &dims));
    }
    shapes
}

fn opt_weights(
    hidden: usize,
    ffn: usize,
    vocab: usize,
    positions: usize,
) -> Vec<(String, Vec<usize>)> {
    let d = "model.decoder";
    let mut shapes = vec![
        shape(format!("{d}.embed_tokens.weight"), &[vocab, hidden]),
        shape(
            format!("{d}.embed_positions.weight"),
            &[positions + 2, hidden],
        ),
        shape(format!("{d}.final_layer_norm.weight"), &[hidden]),
        shape(format!("{d}.final_layer_norm.bias"), &[hidden]),
    ];
    for projection in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        shapes.push(shape(
            format!("{d}.layers.0.self_attn.{projection}.weight"),
            &[hidden, hidden],
        ));
        shapes.push(shape(
            format!("{d}.layers.0.self_attn.{projection}.bias"),
            &[hidden],
        ));
    }
    for norm in ["self_attn_layer_norm", "final_layer_norm"] {
        shapes.push(shape(format!("{d}.layers.0.{norm}.weight"), &[hidden]));
        shapes.push(shape(format!("{d}.layers.0.{norm}.bias"), &[hidden]));
    }
    shapes.push(shape(format!("{d}.layers.0.fc1.weight"), &[ffn, hidden]));
    shapes.push(shape(format!("{d}.layers.0.fc1.bias"), &[ffn]));
    shapes.push(shape(format!("{d}.layers.0.fc2.weight"), &[hidden, ffn]));
    shapes.push(shape(format!("{d}.layers.0.fc2.bias"), &[hidden]));
    shapes
}

fn real_shapes(c: &mut Criterion) {
    let device = Device::Cpu;
    let mut group = c.benchmark_group("real");
    group.sample_size(10);

    let vision_config: VisionConfig = serde_json::from_str(r#"{"num_hidden_layers": 1}"#).unwrap();
    let vision_settings = vision_config.resolve().unwrap();
    let vision_weights = random_weights(&vision_layer_weights(1408, 6144, 257));
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &device).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let vision =
            EvaVisionModel::load(&vision_settings, vision_weights.clone().set_dtype(dtype))
                .unwrap();
        let input = pixels.to_dtype(dtype).unwrap();
        group.bench_function(format!("vision_one_layer_{dtype:?}"), |b| {
            b.iter(|| vision.encode(&input).unwrap())
        });
    }

    let qformer_settings = QFormerConfig::default().resolve(1408).unwrap();
    let mut qformer_shapes = vec![
        shape("qformer.layernorm.weight".into(), &[768]),
        shape("qformer.layernorm.bias".into(), &[768]),
    ];
    for layer in 0..12 {
        let prefix = format!("qformer.encoder.layer.{layer}");
        let mut blocks = vec![("attention", 768usize), ("crossattention", 1408)];
        if layer % 2 == 1 {
            blocks.pop();
        }
        for (block, key_width) in blocks {
            for (part, input) in [("query", 768), ("key", key_width), ("value", key_width)] {
                qformer_shapes.push(shape(
                    format!("{prefix}.{block}.attention.{part}.weight"),
                    &[768, input],
                ));
                qformer_shapes.push(shape(
                    format!("{prefix}.{block}.attention.{part}.bias"),
                    &[768],
                ));
            }
            qformer_shapes.push(shape(
                format!("{prefix}.{block}.output.dense.weight"),
                &[768, 768],
            ));
            qformer_shapes.push(shape(format!("{prefix}.{block}.output.dense.bias"), &[768]));
            qformer_shapes.push(shape(
                format!("{prefix}.{block}.output.LayerNorm.weight"),
                &[768],
            ));
            qformer_shapes.push(shape(
                format!("{prefix}.{block}.output.LayerNorm.bias"),
                &[768],
            ));
        }
        qformer_shapes.push(shape(
            format!("{prefix}.intermediate_query.dense.weight"),
            &[3072, 768],
        ));
        qformer_shapes.push(shape(
            format!("{prefix}.intermediate_query.dense.bias"),
            &[3072],
        ));
        qformer_shapes.push(shape(
            format!("{prefix}.output_query.dense.weight"),
            &[768, 3072],
        ));
        qformer_shapes.push(shape(format!("{prefix}.output_query.dense.bias"), &[768]));
        qformer_shapes.push(shape(
            format!("{prefix}.output_query.LayerNorm.weight"),
            &[768],
        ));
        qformer_shapes.push(shape(
            format!("{prefix}.output_query.LayerNorm.bias"),
            &[768],
        ));
    }
    let qformer = QFormer::load(
        &qformer_settings,
        random_weights(&qformer_shapes).pp("qformer"),
    )
    .unwrap();
    let queries = Tensor::randn(0f32, 1.0, (1, 32, 768), &device).unwrap();
    let image_features = Tensor::randn(0f32, 1.0, (1, 257, 1408), &device).unwrap();
    group.bench_function("qformer", |b| {
        b.iter(|| qformer.query_features(&queries, &image_features).unwrap())
    });

    let opt_config: OptConfig = serde_json::from_str(
        r#"{"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 1, "num_attention_heads": 32,
            "vocab_size": 50304, "max_position_embeddings": 2048}"#,
    )
    .unwrap();
    let opt_settings = opt_config.resolve().unwrap();
    let opt_weights = random_weights(&opt_weights(2560, 10240, 50304, 2048));
    let prompt = Tensor::randn(0f32, 1.0, (1, 33, 2560), &device).unwrap();
    let mask = Tensor::ones((1, 33), DType::U32, &device).unwrap();
    for (name, dtype, quantize) in [
        ("f32", DType::F32, None),
        ("bf16", DType::BF16, None),
        ("q8", DType::F32, Some(QuantKind::Q8)),
        ("q4", DType::F32, Some(QuantKind::Q4)),
    ] {
        let mut opt = OptModel::load(&opt_settings, opt_weights.clone().set_dtype(dtype)).unwrap();
        if let Some(kind) = quantize {
            opt.quantize(kind).unwrap();
        }
        let input = prompt.to_dtype(dtype).unwrap();
        group.bench_function(format!("opt_one_layer_prefill_33_tokens_{name}"), |b| {
            b.iter(|| opt.start(&input, &mask, 1).unwrap().1)
        });
        let (mut session, _) = opt.start(&input, &mask, 1000).unwrap();
        let mut steps = 0;
        group.bench_function(format!("opt_one_layer_decode_step_{name}"), |b| {
            b.iter(|| {
                // Start over before the cache fills, so every step sees a short context.
                if steps == 900 {
                    session = opt.start(&input, &mask, 1000).unwrap().0;
                    steps = 0;
                }
                steps += 1;
                session.step(&[5]).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fixture, real_shapes);
criterion_main!(benches);
