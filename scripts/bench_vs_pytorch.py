"""Time this project against PyTorch transformers on a full-size blip2-opt-2.7b-shaped checkpoint.

Usage:
    python scripts/bench_vs_pytorch.py [--checkpoint DIR] [--threads 2] [--tokens 20] [--repeats 3]
                                       [--modes f32,bf16] [--torch-dtypes float32,bfloat16] [--rounds 1]

The first run writes a checkpoint with the published blip2-opt-2.7b shapes and random weights
(fixed seed, 15.5 GB of float32 safetensors; about 2 GB of memory while writing) to --checkpoint,
default ~/.cache/blip2-bench/blip2-opt-2.7b-random. Later runs reuse it.

Each measurement runs in its own process, so peak memory (maximum resident set size) belongs to
one configuration: PyTorch transformers (versions pinned in scripts/requirements.txt) in each of
--torch-dtypes, and this project's `bench_caption` example in each of --modes. Both caption
images/chelsea.png greedily with exactly --tokens new tokens, on --threads threads. Each stage
runs --repeats times and its median counts, which steadies figures on a shared machine. With
--rounds N the whole set of runs is repeated N times, PyTorch's and this project's in turns, and
each figure is the median over the rounds, so that a slow spell of the machine does not fall on
one side only. The table
gives the time of each stage, the end-to-end caption time after loading, the load time, the peak memory,
and the ratio of each figure to PyTorch's at the same dtype (quantized modes against PyTorch's
bfloat16, its fastest). Quantized modes first run `blip2 quantize`, which saves the quantized
layers next to the checkpoint (the run then loads that file) and prints the quality cost against
float32 on the photos in images/; modes with 8-bit vision or prompt products measure their cost
the same way, with those flags added. The machine's limits, read bandwidth and matrix-multiply rate
measured here (medians of five passes), head the table. The last lines show how close decoding
and the vision encoder come to them. Read bandwidth on a shared machine moves by a factor of two
within minutes, so each decoding bound uses the bandwidth `bench_caption` measured in the same
process, with read passes over 1 GiB taken in turns with its captions.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "images" / "chelsea.png"
SHARD_BYTES = 2_000_000_000

# The published Salesforce/blip2-opt-2.7b configuration (vision and Q-Former use the
# transformers defaults, which are ViT-g/14 and BERT-base sizes).
TEXT_CONFIG = dict(
    model_type="opt", vocab_size=50304, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
    num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
    do_layer_norm_before=True, bos_token_id=2, eos_token_id=50118, pad_token_id=1,
)
IMAGE_TOKEN_INDEX = 50265
NUM_QUERY_TOKENS = 32


def write_checkpoint(directory: Path) -> None:
    """Write random weights shard by shard from the model's shapes, without building it."""
    import torch
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(text_config=TEXT_CONFIG, num_query_tokens=NUM_QUERY_TOKENS,
                         image_token_index=IMAGE_TOKEN_INDEX)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shapes = {name: p.shape for name, p in model.state_dict().items() if name != "language_model.lm_head.weight"}
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        if name.endswith("weight") and "norm" in name.lower():
            tensor = torch.ones(shape)
        elif name.endswith("bias"):
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        current[name] = tensor
        size += tensor.numel() * 4
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
        print(f"wrote {filename}", file=sys.stderr)
    total = sum(t.numel() * 4 for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    generation = {"bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    # A small tokenizer is enough: the prompt is BOS alone and the text is not read.
    fixture = REPO / "tests" / "fixtures" / "models" / "opt-tiny"
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (directory / name).write_bytes((fixture / name).read_bytes())
    processor = json.loads((fixture / "processor_config.json").read_text())
    processor["image_processor"]["size"] = {"height": 224, "width": 224}
    processor["num_query_tokens"] = NUM_QUERY_TOKENS
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))


def median_of_rounds(reports: list) -> dict:
    """Take the median of each numeric figure over the rounds' reports of one run."""
    merged = dict(reports[0])
    for key, value in reports[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(report[key] for report in reports)
    return merged


def timed(function, repeats: int):
    """Call `function` `repeats` times; return the median time and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def torch_worker(checkpoint: Path, dtype_name: str, tokens: int, threads: int, repeats: int) -> dict:
    """One PyTorch measurement; runs in its own process."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()
    load_s = time.perf_counter() - start

    settings = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)
    with torch.no_grad():
        # The first caption pays for bringing memory-mapped weights in; the stage timings
        # below are taken after it, as in the Rust measurement.
        start = time.perf_counter()
        processor = BlipImageProcessorPil.from_pretrained(checkpoint)
        first_pixels = processor([Image.open(PHOTO)], return_tensors="pt")["pixel_values"].to(dtype)
        first_ids = torch.tensor([[IMAGE_TOKEN_INDEX] * NUM_QUERY_TOKENS + [2]])
        model.generate(pixel_values=first_pixels, input_ids=first_ids, **settings)
        first_caption_s = time.perf_counter() - start

        def read_pixels():
            return processor([Image.open(PHOTO)], return_tensors="pt")["pixel_values"].to(dtype)

        preprocess_s, pixels = timed(read_pixels, repeats)
        input_ids = torch.tensor([[IMAGE_TOKEN_INDEX] * NUM_QUERY_TOKENS + [2]])
        vision_s, vision = timed(lambda: model.vision_model(pixels).last_hidden_state, repeats)

        def qformer():
            return model.qformer(
                query_embeds=model.query_tokens,
                encoder_hidden_states=vision,
                encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long),
            ).last_hidden_state

        qformer_s, queries = timed(qformer, repeats)
        projected = model.language_projection(queries.to(dtype))
        embeds = model.get_input_embeddings()(input_ids)
        embeds[:, :NUM_QUERY_TOKENS] = projected
        prefill_s, _ = timed(lambda: model.language_model(inputs_embeds=embeds, use_cache=True), repeats)
        generate_s, _ = timed(lambda: model.generate(pixel_values=pixels, input_ids=input_ids, **settings), repeats)
        total_s, _ = timed(lambda: model.generate(pixel_values=read_pixels(), input_ids=input_ids, **settings), repeats)

    decode = (generate_s - vision_s - qformer_s - prefill_s) / (tokens - 1)
    return dict(load_s=load_s, first_caption_s=first_caption_s, preprocess_s=preprocess_s, vision_s=vision_s, qformer_s=qformer_s,
                prefill_s=prefill_s, decode_per_token_s=decode, total_s=total_s,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def warm_page_cache(checkpoint: Path) -> None:
    """Read the checkpoint once so every run starts with it in the file cache: both sides map
    the weights and would otherwise pay for disk reads that depend on the previous run."""
    for path in sorted(checkpoint.glob("*.safetensors")):
        with open(path, "rb") as file:
            while file.read(64 << 20):
                pass


# Mode suffixes for 8-bit products with per-row weights: the flag each one passes.
INT8_FLAGS = {"vint8": "--vision-int8", "pint8": "--prompt-int8"}


def measure_quality(cli: Path, checkpoint: Path, kind: str, flags: list, env: dict, quality: dict,
                    output: Path = None) -> None:
    """Run `blip2 quantize` on the repository's photos with `flags` and record the quality cost
    it prints; with `output`, it also saves the quantized layers there."""
    key = " ".join([kind, *flags])
    if key in quality:
        return
    photos = sorted(str(p) for p in (REPO / "images").iterdir() if p.suffix in (".png", ".jpg"))
    print(f"blip2 quantize --kind {key} ...", file=sys.stderr)
    command = [str(cli), "quantize", "--model", str(checkpoint), "--kind", kind, *flags, *photos]
    if output:
        command += ["-o", str(output)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    quality[key] = result.stdout.strip().splitlines()[-1]


def quantized_file(cli: Path, checkpoint: Path, kind: str, env: dict, quality: dict) -> Path:
    """Quantize the language model with `blip2 quantize`, saving the layers next to the checkpoint,
    and record the quality cost it measures on the repository's photos."""
    path = checkpoint.parent / f"{checkpoint.name}.{kind}.safetensors"
    measure_quality(cli, checkpoint, kind, [], env, quality, output=path)
    return path


def run_json(command: list, env: dict) -> dict:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine_limits(threads: int) -> dict:
    """Read bandwidth over 1 GiB and the best float32 and bfloat16 matmul rates of PyTorch."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(256 * 1024 * 1024)
    data.sum()
    seconds, _ = timed(data.sum, 5)
    bandwidth = data.numel() * 4 / seconds
    rates = {}
    for dtype in [torch.float32, torch.bfloat16]:
        a = torch.randn(1024, 2048).to(dtype)
        b = torch.randn(2048, 2048).to(dtype)
        a @ b
        seconds, _ = timed(lambda: a @ b, 5)
        rates[str(dtype).replace("torch.", "")] = 2 * 1024 * 2048 * 2048 / seconds
    return dict(bandwidth=bandwidth, matmul=rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache/blip2-bench/blip2-opt-2.7b-random")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="times each stage runs; the median is reported")
    parser.add_argument("--modes", default="f32,f32-lowmem,bf16,f32-q8,f32-q4,bf16-q8,bf16-q4,bf16-q4-vint8-pint8",
                        help="this project's runs: a dtype (f32, bf16, f16), optionally followed by -q8 or -q4 "
                             "(quantized language model), -lowmem (--low-memory), -vint8 (--vision-int8) and "
                             "-pint8 (--prompt-int8)")
    parser.add_argument("--torch-dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=1,
                        help="number of times to repeat the whole set of runs, PyTorch's and this project's in "
                             "turns. Each figure is the median over the rounds")
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, got {args.rounds}")

    if args.torch_worker:
        print(json.dumps(torch_worker(args.checkpoint, args.torch_worker, args.tokens, args.threads, args.repeats)))
        return

    if not (args.checkpoint / "model.safetensors.index.json").exists():
        print(f"writing the random checkpoint to {args.checkpoint}", file=sys.stderr)
        write_checkpoint(args.checkpoint)
    subprocess.run(["cargo", "build", "--release", "--example", "bench_caption", "-p", "blip2"], cwd=REPO, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "blip2-cli"], cwd=REPO, check=True)
    binary = REPO / "target" / "release" / "examples" / "bench_caption"
    cli = REPO / "target" / "release" / "blip2"
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))

    limits = machine_limits(args.threads)
    rounds = []
    quality = {}
    for round_index in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_index + 1} of {args.rounds}", file=sys.stderr)
        runs = {}
        for dtype in args.torch_dtypes.split(","):
            print(f"PyTorch {dtype} ...", file=sys.stderr)
            warm_page_cache(args.checkpoint)
            runs[f"torch {dtype}"] = run_json(
                [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--torch-worker", dtype,
                 "--tokens", str(args.tokens), "--threads", str(args.threads), "--repeats", str(args.repeats)], env)
        for mode in args.modes.split(","):
            print(f"blip2-rs {mode} ...", file=sys.stderr)
            dtype, *extras = mode.split("-")
            command = [str(binary), str(args.checkpoint), str(PHOTO), "--dtype", dtype, "--tokens", str(args.tokens),
                       "--repeats", str(args.repeats)]
            for extra in extras:
                if extra == "lowmem":
                    command += ["--low-memory"]
                elif extra in INT8_FLAGS:
                    command += [INT8_FLAGS[extra]]
                else:
                    command += ["--quantize", str(quantized_file(cli, args.checkpoint, extra, env, quality))]
            int8_flags = [INT8_FLAGS[e] for e in extras if e in INT8_FLAGS]
            kind = next((e for e in extras if e in ("q8", "q4")), None)
            if int8_flags and kind and round_index == 0:
                measure_quality(cli, args.checkpoint, kind, int8_flags, env, quality)
            warm_page_cache(args.checkpoint)
            runs[f"rust {mode}"] = run_json(command, env)
        print("  total_s: " + ", ".join(f"{name} {run['total_s']:.2f}" for name, run in runs.items()), file=sys.stderr)
        rounds.append(runs)
    results = {name: median_of_rounds([runs[name] for runs in rounds]) for name in rounds[0]}

    # Each run is compared with PyTorch at the same dtype; quantized runs with PyTorch's
    # fastest, bfloat16.
    def counterpart(mode: str) -> str:
        return "torch float32" if mode in ("f32", "f32-lowmem") else "torch bfloat16"
    print(f"Machine: {args.threads} threads; read bandwidth {limits['bandwidth'] / 1e9:.1f} GB/s; PyTorch matmul "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in limits["matmul"].items()))
    figures = ["load_s", "first_caption_s", "preprocess_s", "vision_s", "qformer_s", "prefill_s", "decode_per_token_s", "total_s",
               "peak_rss_bytes"]
    print("| run | " + " | ".join(figures) + " |")
    print("|" + " --- |" * (len(figures) + 1))
    for name, result in results.items():
        cells = []
        for figure in figures:
            value = result.get(figure)
            text = f"{value / 2**30:.2f} GiB" if figure == "peak_rss_bytes" else f"{value:.3f}"
            reference = results.get(counterpart(name.split()[-1]))
            if name.startswith("rust") and reference and reference.get(figure):
                text += f" ({value / reference[figure]:.2f}x)"
            cells.append(text)
        print(f"| {name} | " + " | ".join(cells) + " |")

    for kind, line in quality.items():
        print(line)

    # Bytes per language-model weight read per token: 8-bit codes carry a float32 scale per
    # 32 weights, 4-bit codes likewise.
    weight_bytes = {"f32": 4, "bf16": 2, "f16": 2, "q8": 1.125, "q4": 0.625}
    language_params = 2.65e9
    vision_flops = 2 * 1.0e9 * 257
    for name, result in results.items():
        if name.startswith("rust"):
            mode = name.split()[-1]
            dtype, *extras = mode.split("-")
            quantize = next((e for e in extras if e in weight_bytes), None)
            bandwidth = result["read_bandwidth_bytes_per_s"]
            bound = language_params * weight_bytes[quantize or dtype] / bandwidth
            decode = result["decode_between_reads_per_token_s"]
            print(f"{name}: decode {decode:.3f} s/token vs bandwidth bound {bound:.3f} s at {bandwidth / 1e9:.1f} GB/s "
                  f"({decode / bound:.2f}x); vision {vision_flops / result['vision_s'] / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
