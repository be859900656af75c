//! Times each stage of one caption and reports it as JSON, for the side-by-side
//! comparison with PyTorch in `scripts/bench_vs_pytorch.py`:
//!
//! `cargo run --release --example bench_caption -- MODEL IMAGE [--dtype f32|bf16|f16] [--quantize q8|q4|FILE]
//! [--low-memory] [--vision-int8] [--prompt-int8] [--tokens 20] [--repeats 3]`
//!
//! The caption is forced to exactly `--tokens` new tokens (minimum = maximum), greedy.
//! One caption runs first (reported as `first_caption_s`); the stage timings and the
//! end-to-end `total_s` are measured after it, each the median of `--repeats` runs.
//! Peak memory is the process's peak resident set size (`VmHWM`), read before the last
//! phase.
//!
//! The last phase measures decoding against the memory bandwidth of the same moment,
//! because the bandwidth of a shared machine can change by a factor of two within
//! minutes. It runs `--repeats` times one read pass over a 1 GiB buffer, on as many
//! threads as the model uses, each reading four streams side by side, then one caption. It reports the median read bandwidth and
//! the median time per token of those captions.

use std::time::Instant;

use blip2::pipeline::{Blip2, LoadOptions, parse_dtype, parse_quantization};

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of the buffer the read passes sum.
const PROBE_BYTES: usize = 1 << 30;

/// Times one pass that sums `buffer` on `threads` threads, each over its own slice, and
/// returns the bytes read per second.
fn read_bandwidth(buffer: &[u64], threads: usize) -> f64 {
    let start = Instant::now();
    let total = std::thread::scope(|scope| {
        let handles: Vec<_> = buffer
            .chunks(buffer.len().div_ceil(threads.max(1)))
            .map(|part| scope.spawn(|| sum_four_streams(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a read thread panicked"))
            .fold(0u64, u64::wrapping_add)
    });
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(total);
    std::mem::size_of_val(buffer) as f64 / seconds
}

/// Sums the four quarters of `part` side by side, as f32 decoding reads four weight rows.
/// One core keeps more reads in flight that way than along a single stream: on a 2-core
/// Xeon, two threads read 27 GB/s like this and 20 GB/s with one stream each.
fn sum_four_streams(part: &[u64]) -> u64 {
    let quarter = part.len() / 4;
    let (a, rest) = part.split_at(quarter);
    let (b, rest) = rest.split_at(quarter);
    let (c, d) = rest.split_at(quarter);
    let mut sums = [0u64; 4];
    for i in 0..quarter {
        sums[0] = sums[0].wrapping_add(a[i]);
        sums[1] = sums[1].wrapping_add(b[i]);
        sums[2] = sums[2].wrapping_add(c[i]);
        sums[3] = sums[3].wrapping_add(d[i]);
    }
    let tail = d[quarter..]
        .iter()
        .fold(0u64, |sum, &v| sum.wrapping_add(v));
    sums.iter().fold(tail, |sum, &v| sum.wrapping_add(v))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

type Outcome<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs `stage` `repeats` times (at least once); returns the median time and the last result.
fn median_time<T>(repeats: usize, mut stage: impl FnMut() -> Outcome<T>) -> Outcome<(f64, T)> {
    let mut times = Vec::new();
    let mut result = None;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        result = Some(stage()?);
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let result = result.expect("the stage ran at least once");
    Ok((times[times.len() / 2], result))
}

fn arg_value(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, image, ..] = args.as_slice() else {
        return Err("usage: bench_caption MODEL IMAGE [--dtype f32|bf16|f16] \
                    [--quantize q8|q4|FILE] [--low-memory] [--vision-int8] [--prompt-int8] [--tokens N] [--repeats N]"
            .into());
    };
    let dtype = parse_dtype(&arg_value(&args, "--dtype").unwrap_or_else(|| "f32".into()))?;
    let tokens: usize = arg_value(&args, "--tokens").map_or(Ok(20), |t| t.parse())?;
    let repeats: usize = arg_value(&args, "--repeats").map_or(Ok(3), |t| t.parse())?;
    let low_memory = args.iter().any(|a| a == "--low-memory");
    let vision_int8 = args.iter().any(|a| a == "--vision-int8");
    let prompt_int8 = args.iter().any(|a| a == "--prompt-int8");
    // `q8` or `q4` quantizes at load; anything else names a file `blip2 quantize` wrote.
    let quantize_arg = arg_value(&args, "--quantize");
    let (quantize, quantized_weights) = match quantize_arg.as_deref() {
        Some(name @ ("q8" | "q4")) => (Some(parse_quantization(name)?), None),
        Some(path) => (None, Some(std::path::PathBuf::from(path))),
        None => (None, None),
    };

    let start = Instant::now();
    let blip2 = Blip2::from_pretrained(
        model,
        &LoadOptions {
            dtype,
            quantize,
            quantized_weights,
            low_memory,
            vision_int8,
            prompt_int8,
            ..Default::default()
        },
    )?;
    let load_s = start.elapsed().as_secs_f64();

    let mut options = blip2.default_generation_options();
    options.max_new_tokens = tokens;
    options.min_new_tokens = tokens;

    // The first caption pays for bringing memory-mapped weights in; the stage timings
    // below are taken after it.
    let start = Instant::now();
    let photo = blip2::image::load_image(image, &Default::default())?;
    blip2.caption(&photo, None, &options)?;
    let first_caption_s = start.elapsed().as_secs_f64();

    let (preprocess_s, pixels) = median_time(repeats, || {
        let photo = blip2::image::load_image(image, &Default::default())?;
        Ok(blip2.pixel_values(std::slice::from_ref(&photo))?)
    })?;

    let model_ref = blip2.model();
    let (vision_s, vision) = median_time(repeats, || {
        Ok(model_ref
            .vision_encoder()
            .encode(&pixels.to_dtype(model_ref.dtype())?)?)
    })?;
    let (qformer_s, _) = median_time(repeats, || {
        Ok(model_ref
            .qformer()
            .query_features(model_ref.query_tokens(), &vision)?)
    })?;

    let features = blip2.encode_images(&pixels)?;
    let (prefill_s, _) = median_time(repeats, || Ok(blip2.first_token_logits(&features, &[])?))?;
    let (generate_s, captions) = median_time(repeats, || {
        Ok(blip2.generate_from_features(&features, &[], &options, None)?)
    })?;
    let generated = captions[0][0].token_ids.len();

    // End to end: what `blip2 caption` does after loading.
    let (total_s, caption) = median_time(repeats, || {
        let photo = blip2::image::load_image(image, &Default::default())?;
        Ok(blip2.caption(&photo, None, &options)?)
    })?;

    let decode_per_token_s = (generate_s - prefill_s) / (generated.max(2) - 1) as f64;
    let peak_rss = peak_rss_bytes();

    // Decoding and read passes, taken in turns.
    let threads = candle_core::utils::get_num_threads();
    let probe = vec![1u64; PROBE_BYTES / 8];
    read_bandwidth(&probe, threads);
    let mut bandwidths = Vec::new();
    let mut decode_times = Vec::new();
    for _ in 0..repeats.max(1) {
        bandwidths.push(read_bandwidth(&probe, threads));
        let start = Instant::now();
        let captions = blip2.generate_from_features(&features, &[], &options, None)?;
        let steps = captions[0][0].token_ids.len().max(2) - 1;
        decode_times.push((start.elapsed().as_secs_f64() - prefill_s) / steps as f64);
    }
    let report = serde_json::json!({
        "dtype": format!("{dtype:?}"),
        "quantize": quantize_arg,
        "low_memory": low_memory,
        "vision_int8": vision_int8,
        "prompt_int8": prompt_int8,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "load_s": load_s,
        "first_caption_s": first_caption_s,
        "preprocess_s": preprocess_s,
        "vision_s": vision_s,
        "qformer_s": qformer_s,
        "prefill_s": prefill_s,
        "decode_per_token_s": decode_per_token_s,
        "generate_s": generate_s,
        "generated_tokens": generated,
        "total_s": total_s,
        "repeats": repeats,
        "caption_tokens": caption.token_ids.len(),
        "peak_rss_bytes": peak_rss,
        "read_bandwidth_bytes_per_s": median(bandwidths),
        "decode_between_reads_per_token_s": median(decode_times),
    });
    println!("{report}");
    Ok(())
}
