"""Make the tiny BLIP-2 checkpoints and record the reference outputs the Rust tests compare to.

Usage: python scripts/make_fixtures.py [--out tests/fixtures]

Run it with the pinned versions in scripts/requirements.txt; it refuses other versions, because
reference outputs are only meaningful for the exact library code that produced them. It writes:

- `models/NAME/`: a checkpoint with random weights in the layout published on the Hugging Face hub
  (config.json, safetensors weights, tokenizer.json, tokenizer_config.json, processor settings,
  generation_config.json). The models differ in shape on purpose (see MODELS below).
- `reference/NAME.safetensors`: float32 tensors from transformers for the repo photos: pixel values,
  vision encoder output, Q-Former output, projected queries and first-step logits.
- `reference/NAME.json`: generation cases (inputs, settings) and the token ids, texts and beam scores
  transformers' `generate` returned.

Every generation case is also run in float64; the script stops if the tokens differ, so the recorded
tokens never hinge on a near-tie that float32 rounding could flip.
"""

import argparse
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

# The BPE trainer runs on one thread, so that merges with equal counts keep a stable order.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import numpy as np
import PIL
import safetensors
import tokenizers
import torch
import transformers
from PIL import Image

PINNED = {
    "torch": "2.15.0",
    "transformers": "5.23.0",
    "pillow": "13.0.0",
    "numpy": "2.4.6",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.3",
}
FOUND = {
    "torch": torch.__version__.split("+")[0],
    "transformers": transformers.__version__,
    "pillow": PIL.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
    "tokenizers": tokenizers.__version__,
}
if FOUND != PINNED:
    sys.exit(f"make_fixtures.py needs {PINNED}, found {FOUND}; install scripts/requirements.txt")

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ["chelsea.png", "rocket.jpg", "coffee.png", "astronaut.png", "camera.png"]

# Text the tiny byte-level BPE tokenizer is trained on: caption- and question-like English.
CORPUS = """a photo of a cat lying on a red blanket
a tabby cat sitting on a sofa and looking at the camera
a rocket on the launch pad under a blue sky
a cup of coffee on a saucer with a spoon
an astronaut in an orange suit with the american flag
a man with a camera on a tripod in a field
Question: what is the cat lying on? Answer: a blanket
Question: what color is the sky? Answer: blue
Question: how many cups are there? Answer: one
the picture shows a person standing next to a white building
two dogs playing with a ball in the park at sunset
a close up of a plate of food with rice and vegetables
a black and white photo of a city street with cars
a group of people riding bikes down the road
""".split("\n")

# Each model has a different shape, so that no size can hide behind a default.
MODELS = {
    # Pre-layer-norm OPT; weights as transformers 5 saves them (one file, fused `qkv.bias`),
    # processor settings as transformers 5 writes them (processor_config.json).
    "opt-tiny": dict(
        family="opt",
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=56, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=2),
        text=dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64),
        num_query_tokens=8,
        layout="qkv_bias",
        shards=None,
        processor_file="processor_config.json",
        stop_early=True,
    ),
    # Token embeddings narrower than the decoder (`word_embed_proj_dim` 16 vs hidden 48), three
    # shards with an index, the older published layout (`q_bias` and `v_bias`, a stored
    # `lm_head.weight`, a flat preprocessor_config.json), cross-attention in every Q-Former layer.
    "opt-proj-sharded": dict(
        family="opt",
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                    image_size=42, patch_size=14, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                     cross_attention_frequency=1, layer_norm_eps=1e-6),
        text=dict(hidden_size=48, ffn_dim=80, num_hidden_layers=3, num_attention_heads=6,
                  word_embed_proj_dim=16, max_position_embeddings=80),
        num_query_tokens=6,
        layout="q_v_bias",
        shards=3,
        processor_file="preprocessor_config.json",
        stop_early=False,
    ),
    # Post-layer-norm OPT (like OPT-350m) with an untied output projection and GELU feed-forward,
    # cross-attention every third Q-Former layer, eight attention heads in the decoder.
    "opt-postln": dict(
        family="opt",
        vision=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                    image_size=28, patch_size=14),
        qformer=dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5,
                     cross_attention_frequency=3),
        text=dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=8,
                  do_layer_norm_before=False, activation_function="gelu", tie_word_embeddings=False,
                  max_position_embeddings=96),
        num_query_tokens=4,
        layout="qkv_bias",
        shards=None,
        processor_file="processor_config.json",
        stop_early=False,
    ),
    # Flan-T5 as published: gated-GELU feed-forward, an output layer separate from the
    # embeddings (no output scaling), and every tied copy of the embeddings stored.
    "flan-t5-tiny": dict(
        family="t5",
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    image_size=42, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=2),
        text=dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16),
        num_query_tokens=8,
        # Random T5 decoders tend to repeat one token; these scales give varied output.
        init=dict(relative_bias_std=4.0, shared_std=1.0, output_gain=1.0),
        layout="t5_published",
        shards=None,
        processor_file="processor_config.json",
        stop_early=False,
    ),
    # Original-T5 style: ReLU feed-forward, tied embeddings (so the decoder output is scaled by
    # d_model^-0.5), heads of width 10 that do not add up to d_model, a one-layer decoder under a
    # three-layer encoder; saved as transformers 5 saves it, in two shards.
    "t5-relu-tied": dict(
        family="t5",
        vision=dict(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=3,
                    image_size=28, patch_size=14),
        qformer=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                     cross_attention_frequency=1),
        text=dict(d_model=24, d_kv=10, d_ff=40, num_layers=3, num_decoder_layers=1, num_heads=3,
                  feed_forward_proj="relu", relative_attention_num_buckets=12,
                  relative_attention_max_distance=24),
        num_query_tokens=5,
        init=dict(relative_bias_std=4.0, shared_std=0.1, output_gain=1.0),
        layout="qkv_bias",
        shards=2,
        processor_file="processor_config.json",
        stop_early=False,
    ),
}

PROMPTS = ["a photo of", "Question: what is the cat lying on? Answer:", "an"]

# Warper settings whose next-token distributions are recorded for the sampling tests.
SAMPLING_SETTINGS = [
    dict(temperature=1.0, top_k=5, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=0.6),
    dict(temperature=0.7, top_k=10, top_p=0.9),
    dict(temperature=1.5, top_k=50, top_p=1.0),
]


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A tokenizer of the kind the family's checkpoints ship, trained on CORPUS."""
    return build_opt_tokenizer() if family == "opt" else build_t5_tokenizer()


def build_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer with T5's special tokens and its `</s>` suffix.

    The vocabulary is counted directly from CORPUS instead of trained, because the Unigram
    trainer's floating-point sums vary from run to run and would reorder ids.
    """
    counts = Counter()
    for line in CORPUS:
        for word in line.split():
            piece = "\u2581" + word
            for start in range(len(piece)):
                for end in range(start + 1, min(len(piece), start + 6) + 1):
                    counts[piece[start:end]] += 1
    characters = sorted({piece for piece in counts if len(piece) == 1})
    longer = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p] * len(p), p))[:150]
    total = sum(counts.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(counts[piece] / total)) for piece in characters + longer]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    fast.padding_side = "right"
    return fast


def build_opt_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with OPT's special tokens and its `</s>` prefix."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in CORPUS if line] * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.padding_side = "left"
    return fast


def randomize(model: torch.nn.Module, generator: torch.Generator, init: dict | None = None) -> None:
    """Give every parameter a random value of a scale that keeps activations near unit size.

    transformers' own initialisation is unusable for this: it sets the vision weights to ~1e-10 and
    the query tokens to zero, so every image would produce the same output.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
            elif name.endswith("bias"):
                value = 0.1 * torch.randn(param.shape, generator=generator)
            elif param.dim() >= 2 and "embed" not in name and "query_tokens" not in name:
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=generator) / fan_in**0.5
            elif "embed_positions" in name:
                # Large position embeddings make the next token depend on the step. With tied
                # embeddings a random decoder otherwise keeps predicting the token it was fed.
                value = 2.0 * torch.randn(param.shape, generator=generator)
            else:
                value = 0.5 * torch.randn(param.shape, generator=generator)
            param.copy_(value)
        # Per-model scales for T5: relative position biases, shared embeddings, and a gain on
        # the attention and feed-forward output projections.
        if init:
            for name, param in model.named_parameters():
                if "relative_attention_bias" in name:
                    param.copy_(init["relative_bias_std"] * torch.randn(param.shape, generator=generator))
                elif name.endswith("shared.weight"):
                    param.copy_(init["shared_std"] * torch.randn(param.shape, generator=generator))
                elif name.startswith("language_model") and (".wo." in name or name.endswith(".o.weight")):
                    param.mul_(init["output_gain"])
        # The fused vision `qkv.bias` holds [q, k, v]; the key part is zero in every published
        # checkpoint (they store only q_bias and v_bias), which the split layout relies on.
        for name, param in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                third = param.shape[0] // 3
                param[third : 2 * third] = 0.0


def rewrite_layout(model_dir: Path, spec: dict) -> None:
    """Turn transformers 5's saved weights into an older published layout when asked."""
    if spec["layout"] == "t5_published":
        # Flan-T5 BLIP-2 checkpoints store the shared embeddings three times and the output layer.
        path = model_dir / "model.safetensors"
        tensors = load_file(path)
        shared = tensors["language_model.shared.weight"]
        tensors["language_model.encoder.embed_tokens.weight"] = shared.clone()
        tensors["language_model.decoder.embed_tokens.weight"] = shared.clone()
        assert "language_model.lm_head.weight" in tensors, "an untied output layer is saved"
        save_file(tensors, path, metadata={"format": "pt"})
        # Their config says `tie_word_embeddings: false` and has no `scale_decoder_outputs`,
        # which transformers 5 adds when it saves.
        config_path = model_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["text_config"]["tie_word_embeddings"] = False
        del config["text_config"]["scale_decoder_outputs"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return
    if spec["layout"] != "q_v_bias":
        return
    index_path = model_dir / "model.safetensors.index.json"
    files = sorted(model_dir.glob("model*.safetensors"))
    weight_map = {}
    for path in files:
        tensors = load_file(path)
        for name in list(tensors):
            if name.endswith("self_attn.qkv.bias"):
                bias = tensors.pop(name)
                third = bias.shape[0] // 3
                tensors[name.replace("qkv.bias", "q_bias")] = bias[:third].clone()
                tensors[name.replace("qkv.bias", "v_bias")] = bias[2 * third :].clone()
        if "language_model.model.decoder.embed_tokens.weight" in tensors:
            tensors["language_model.lm_head.weight"] = tensors["language_model.model.decoder.embed_tokens.weight"].clone()
        save_file(tensors, path, metadata={"format": "pt"})
        weight_map.update({name: path.name for name in tensors})
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index_path.write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(name: str, spec: dict, tokenizer, model_dir: Path, seed: int):
    """Build, randomize and save one model; return the model as transformers loads it back."""
    image_token_id = len(tokenizer)  # `<image>` is appended by the processor, as on the hub
    if spec["family"] == "opt":
        # The BLIP-2 OPT checkpoints end captions on a newline.
        stop_id = tokenizer.convert_tokens_to_ids("\u010a")
        special = dict(bos_token_id=2, eos_token_id=stop_id, pad_token_id=1)
        text = dict(model_type="opt", vocab_size=image_token_id + 8, **special, **spec["text"])
    else:
        stop_id = 1
        special = dict(eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
        text = dict(model_type="t5", vocab_size=image_token_id + 4, **special, **spec["text"])
    config = Blip2Config(
        vision_config=spec["vision"],
        qformer_config=spec["qformer"],
        text_config=text,
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    randomize(model, generator, spec.get("init"))
    for key, value in special.items():
        setattr(model.generation_config, key, value)
    if spec["family"] == "t5":
        # Random values for the output layer too (transformers ties it to the embeddings at
        # construction); the published Flan-T5 output layer differs from its embeddings.
        with torch.no_grad():
            if spec["text"].get("tie_word_embeddings") is False:
                head = torch.randn(model.language_model.lm_head.weight.shape, generator=generator)
                model.language_model.lm_head.weight = torch.nn.Parameter(head / spec["text"]["d_model"] ** 0.5)

    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    if spec["shards"]:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(model_dir, max_shard_size=total // spec["shards"] + 1)
    else:
        model.save_pretrained(model_dir)
    rewrite_layout(model_dir, spec)

    size = spec["vision"]["image_size"]
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=spec["num_query_tokens"])
    processor.save_pretrained(model_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_id
    if spec["processor_file"] == "preprocessor_config.json":
        (model_dir / "processor_config.json").unlink()
        image_processor.to_json_file(model_dir / "preprocessor_config.json")
    return image_token_id, stop_id


def load_reference(model_dir: Path, dtype=torch.float32) -> Blip2ForConditionalGeneration:
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    return model


def check_layout_loads(model_dir: Path, model: Blip2ForConditionalGeneration, spec: dict) -> None:
    """The q_bias/v_bias layout is not read by transformers 5.23, so compare against the saved model."""
    if spec["layout"] == "q_v_bias":
        return
    saved = {}
    for path in model_dir.glob("model*.safetensors"):
        saved.update(load_file(path))
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), f"{name} does not round-trip"


def image_inputs(model_dir: Path, size_override=None):
    processor = BlipImageProcessorPil.from_pretrained(model_dir)
    assert isinstance(processor, BlipImageProcessorPil), type(processor)
    if size_override:
        processor.size = {"height": size_override, "width": size_override}
    images = [Image.open(REPO / "images" / name) for name in PHOTOS]
    return processor(images, return_tensors="pt")["pixel_values"]


def input_ids_for(tokenizer, prompt: str, image_token_id: int, num_query_tokens: int):
    """The ids Blip2Processor builds: one `<image>` per query, then the tokenized prompt.

    An empty prompt is BOS alone for OPT (what Blip2 `generate` uses without text) and the
    tokenization of "" for T5 (just `</s>`; T5 has no BOS).
    """
    if prompt or tokenizer.bos_token_id is None:
        ids = tokenizer(prompt).input_ids
    else:
        ids = [tokenizer.bos_token_id]
    return [image_token_id] * num_query_tokens + ids


def run_generate(model, pixel_values, ids_list, settings, pad_id, eos_ids):
    """Batch the inputs padded as Blip2Processor pads them and return the new tokens per sequence.

    OPT pads on the left, which puts the padding between the image tokens and the text; T5 pads
    on the right.

    The end-of-sequence ids are passed explicitly: transformers 5.23's Blip2 `generate` delegates
    to the language model, which reads its own defaults (from `text_config`) rather than the
    checkpoint's generation_config.json. The Rust side reads generation_config.json, so passing
    the same ids here keeps both sides on the same settings.
    """
    num_query_tokens = model.config.num_query_tokens
    longest = max(len(ids) for ids in ids_list)
    input_ids, mask = [], []
    encoder_decoder = model.config.text_config.is_encoder_decoder
    for ids in ids_list:
        padding = longest - len(ids)
        if encoder_decoder:
            input_ids.append(ids + [pad_id] * padding)
            mask.append([1] * len(ids) + [0] * padding)
        else:
            input_ids.append(ids[:num_query_tokens] + [pad_id] * padding + ids[num_query_tokens:])
            mask.append([1] * num_query_tokens + [0] * padding + [1] * (len(ids) - num_query_tokens))
    input_ids = torch.tensor(input_ids)
    mask = torch.tensor(mask)
    with torch.no_grad():
        out = model.generate(
            pixel_values=pixel_values.to(model.dtype),
            input_ids=input_ids,
            attention_mask=mask,
            return_dict_in_generate=True,
            output_scores=True,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **settings,
        )
    # Decoder-only output repeats the input; encoder-decoder output starts with the decoder start token.
    skip = 1 if encoder_decoder else input_ids.shape[1]
    sequences = out.sequences[:, skip:].tolist()
    results = []
    for row in sequences:
        cut = len(row)
        for i, token in enumerate(row):
            if token in eos_ids:
                cut = i + 1
                break
        results.append(row[:cut])
    scores = out.sequences_scores.tolist() if getattr(out, "sequences_scores", None) is not None else None
    return results, scores


def generation_cases(num_images: int):
    """(name, image indices, prompts, settings) for every recorded generation."""
    cases = []
    for i in range(num_images):
        cases.append((f"greedy_image{i}", [i], [""], dict(max_new_tokens=12)))
    cases += [
        ("greedy_prompt", [0], [PROMPTS[0]], dict(max_new_tokens=10)),
        ("greedy_question", [0], [PROMPTS[1]], dict(max_new_tokens=8)),
        ("greedy_batch_mixed_prompts", [0, 1, 2], [PROMPTS[0], "", PROMPTS[1]], dict(max_new_tokens=10)),
        ("greedy_repetition_penalty", [1], [""], dict(max_new_tokens=12, repetition_penalty=1.5)),
        ("greedy_no_repeat_ngram", [2], [PROMPTS[2]], dict(max_new_tokens=12, no_repeat_ngram_size=2)),
        ("greedy_min_new_tokens", [0], [""], dict(max_new_tokens=12, min_new_tokens=8)),
        ("beam3", [0], [""], dict(max_new_tokens=10, num_beams=3)),
        ("beam3_prompt_two_returned", [3], [PROMPTS[0]], dict(max_new_tokens=9, num_beams=3, num_return_sequences=2)),
        ("beam4_length_penalty", [1], [""], dict(max_new_tokens=10, num_beams=4, length_penalty=0.3)),
        ("beam3_early_stopping", [2], [""], dict(max_new_tokens=10, num_beams=3, early_stopping=True)),
        ("beam3_never", [4], [""], dict(max_new_tokens=8, num_beams=3, early_stopping="never", length_penalty=1.5)),
        ("beam2_batch", [0, 4, 1], ["", PROMPTS[2], PROMPTS[0]], dict(max_new_tokens=8, num_beams=2)),
        ("beam3_penalties", [3], [""], dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.3,
                                            no_repeat_ngram_size=2, min_new_tokens=4)),
    ]
    return cases


def record(name: str, spec: dict, tokenizer, out: Path, seed: int) -> None:
    model_dir = out / "models" / name
    image_token_id, stop_id = save_checkpoint(name, spec, tokenizer, model_dir, seed)
    pad_id = tokenizer.pad_token_id
    model = load_reference(model_dir)
    check_layout_loads(model_dir, model, spec)
    if spec["family"] == "t5":
        expected_scale = spec["text"].get("tie_word_embeddings") is not False
        assert model.config.text_config.scale_decoder_outputs == expected_scale, "decoder output scaling"
    if spec["layout"] == "q_v_bias":
        # transformers 5.23 cannot read q_bias/v_bias; rebuild the fused bias it expects.
        rebuilt = {}
        for path in model_dir.glob("model*.safetensors"):
            rebuilt.update(load_file(path))
        for key in [k for k in rebuilt if k.endswith("q_bias")]:
            prefix = key[: -len("q_bias")]
            q, v = rebuilt.pop(key), rebuilt.pop(prefix + "v_bias")
            rebuilt[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        missing, unexpected = model.load_state_dict(rebuilt, strict=False)
        assert not unexpected, unexpected
        assert all("lm_head" in k for k in missing), missing
    model64 = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float64).eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})

    pixel_values = image_inputs(model_dir)
    num_query_tokens = spec["num_query_tokens"]
    tensors = {"pixel_values": pixel_values.contiguous()}
    with torch.no_grad():
        vision = model.vision_model(pixel_values).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(len(PHOTOS), -1, -1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        projected = model.language_projection(queries)
        tensors["vision_last_hidden_state"] = vision.contiguous()
        tensors["qformer_last_hidden_state"] = queries.contiguous()
        tensors["language_projection"] = projected.contiguous()
        extra = {}
        if spec["family"] == "t5":
            extra["decoder_input_ids"] = torch.tensor([[model.config.text_config.decoder_start_token_id]])
        for prompt_index, prompt in enumerate(["", PROMPTS[0]]):
            ids = input_ids_for(tokenizer, prompt, image_token_id, num_query_tokens)
            logits = [
                model(pixel_values=pixel_values[i : i + 1], input_ids=torch.tensor([ids]), **extra).logits[:, -1, :]
                for i in range(len(PHOTOS))
            ]
            tensors[f"first_logits_prompt{prompt_index}"] = torch.cat(logits).contiguous()
        # Position-embedding interpolation: images 14 pixels larger than the checkpoint's size.
        larger = spec["vision"]["image_size"] + 14
        larger_pixels = image_inputs(model_dir, size_override=larger)
        tensors["interpolated_pixel_values"] = larger_pixels.contiguous()
        tensors["interpolated_vision_last_hidden_state"] = model.vision_model(
            larger_pixels, interpolate_pos_encoding=True
        ).last_hidden_state.contiguous()

    eos_ids = [stop_id]
    if spec["stop_early"]:
        # Make the first photo's greedy caption stop early by adding one of its tokens (the first
        # new one after the second position) to the end-of-sequence ids, so stopping on a list of
        # ids is exercised.
        plain, _ = run_generate(model, pixel_values[:1], [input_ids_for(tokenizer, "", image_token_id, num_query_tokens)],
                                dict(max_new_tokens=12), pad_id, eos_ids)
        caption = plain[0]
        stop = next((t for i, t in enumerate(caption) if i >= 2 and t not in caption[:i]), None)
        assert stop is not None, f"{name}: the caption {caption} repeats one token; pick another seed"
        eos_ids.append(stop)
        generation_config = json.loads((model_dir / "generation_config.json").read_text())
        generation_config["eos_token_id"] = eos_ids
        (model_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        model.generation_config.eos_token_id = eos_ids
        model64.generation_config.eos_token_id = eos_ids

    # When the token embeddings are narrower than the decoder, transformers fills the query slots of
    # a batch from one flat buffer, so image i reads part of image i-1's projection. The reference
    # for such a model is therefore each item generated alone; the Rust tests check separately that
    # its batches equal its single runs.
    text = spec["text"]
    items_alone = spec["family"] == "opt" and text.get("word_embed_proj_dim", text["hidden_size"]) != text["hidden_size"]

    def reference_generate(reference_model, images, ids_list, settings):
        if not items_alone:
            return run_generate(reference_model, pixel_values[images], ids_list, settings, pad_id, eos_ids)
        tokens, scores = [], []
        for image, ids in zip(images, ids_list):
            item_tokens, item_scores = run_generate(reference_model, pixel_values[[image]], [ids], settings, pad_id, eos_ids)
            tokens += item_tokens
            scores = None if item_scores is None else scores + item_scores
        return tokens, scores

    cases = []
    for case_name, images, prompts, settings in generation_cases(len(PHOTOS)):
        ids_list = [input_ids_for(tokenizer, p, image_token_id, num_query_tokens) for p in prompts]
        tokens, scores = reference_generate(model, images, ids_list, settings)
        tokens64, _ = reference_generate(model64, images, ids_list, settings)
        if tokens != tokens64:
            sys.exit(f"{name}/{case_name}: float32 and float64 choose different tokens {tokens} vs {tokens64}; "
                     "the case sits on a near-tie, change the seed")
        per_input = settings.get("num_return_sequences", 1)
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        cases.append(dict(
            name=case_name,
            images=images,
            prompts=prompts,
            settings=settings,
            prompt_ids=[ids[num_query_tokens:] for ids in ids_list],
            tokens=[tokens[i * per_input:(i + 1) * per_input] for i in range(len(images))],
            texts=[texts[i * per_input:(i + 1) * per_input] for i in range(len(images))],
            scores=None if scores is None else [scores[i * per_input:(i + 1) * per_input] for i in range(len(images))],
        ))

    # Sampling: the next-token distribution after transformers' warpers (temperature, top-k,
    # top-p, in generate's order) for the first photo's caption, as {token id: probability}.
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    sampling = []
    logits = tensors["first_logits_prompt0"][:1].double()
    for settings in SAMPLING_SETTINGS:
        warpers = LogitsProcessorList()
        if settings["temperature"] != 1.0:
            warpers.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            warpers.append(TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"] < 1.0:
            warpers.append(TopPLogitsWarper(settings["top_p"]))
        warped = warpers(torch.zeros((1, 1), dtype=torch.long), logits.float())
        probabilities = torch.softmax(warped, dim=-1)[0]
        kept = {int(i): float(probabilities[i]) for i in torch.nonzero(probabilities > 0).flatten()}
        sampling.append(dict(settings=settings, probabilities=kept))

    reference_dir = out / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, reference_dir / f"{name}.safetensors")
    meta = dict(
        model=name,
        photos=PHOTOS,
        image_token_id=image_token_id,
        eos_token_ids=eos_ids,
        logits_prompts=["", PROMPTS[0]],
        items_run_alone=items_alone,
        sampling=sampling,
        cases=cases,
    )
    (reference_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: {len(cases)} generation cases")


def check_processor_round_trip(out: Path) -> None:
    """The saved files, loaded by AutoProcessor, give the inputs the cases were built from."""
    model_dir = out / "models" / "opt-tiny"
    processor = transformers.AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    image = Image.open(REPO / "images" / PHOTOS[0])
    encoded = processor(images=[image], text=[PROMPTS[0]], return_tensors="pt")
    expected = image_inputs(model_dir)[:1]
    assert torch.equal(encoded["pixel_values"], expected), "processor pixel values differ"
    meta = json.loads((out / "reference" / "opt-tiny.json").read_text())
    nq = MODELS["opt-tiny"]["num_query_tokens"]
    assert encoded["input_ids"][0].tolist() == [meta["image_token_id"]] * nq + processor.tokenizer(PROMPTS[0]).input_ids


# Image-text retrieval checkpoints (`Blip2ForImageTextRetrieval`, like Salesforce/blip2-itm-vit-g):
# no language model; a BERT WordPiece tokenizer, Q-Former text embeddings, projections to the
# shared embedding space and the matching head.
RETRIEVAL_MODELS = {
    "itm-tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    image_size=42, patch_size=14),
        qformer=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     cross_attention_frequency=2, max_position_embeddings=40, use_qformer_text_input=True),
        num_query_tokens=6,
        image_text_hidden_size=16,
        # Like the transformers 5 processors: `<image>` placeholders in front of the text ids.
        image_tokens=True,
        processor_file="processor_config.json",
    ),
    "itm-wide": dict(
        vision=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
                    image_size=28, patch_size=14, layer_norm_eps=1e-5),
        qformer=dict(hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=6,
                     cross_attention_frequency=1, max_position_embeddings=48, use_qformer_text_input=True,
                     layer_norm_eps=1e-6),
        num_query_tokens=4,
        image_text_hidden_size=12,
        image_tokens=False,
        processor_file="preprocessor_config.json",
    ),
}

RETRIEVAL_TEXTS = [
    "a tabby cat lying on a red blanket",
    "a rocket on the launch pad",
    "a cup of coffee",
    "an astronaut with the american flag in an orange suit",
    "a man",
]


def build_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens and [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    tokenizer.train_from_iterator([line for line in CORPUS if line] * 4, trainer)
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
    )
    tokenizer.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]",
    )
    fast.padding_side = "right"
    return fast


def record_retrieval(name: str, spec: dict, out: Path, seed: int) -> None:
    tokenizer = build_bert_tokenizer()
    model_dir = out / "models" / name
    image_token_id = len(tokenizer)
    qformer = dict(spec["qformer"], vocab_size=image_token_id + 2, pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(
        vision_config=spec["vision"],
        qformer_config=qformer,
        num_query_tokens=spec["num_query_tokens"],
        image_text_hidden_size=spec["image_text_hidden_size"],
        image_token_index=image_token_id if spec["image_tokens"] else None,
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir)
    size = spec["vision"]["image_size"]
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=spec["num_query_tokens"] if spec["image_tokens"] else None)
    processor.save_pretrained(model_dir)
    if spec["processor_file"] == "preprocessor_config.json":
        (model_dir / "processor_config.json").unlink()
        image_processor.to_json_file(model_dir / "preprocessor_config.json")
    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    check_layout_loads(model_dir, model, dict(layout="qkv_bias"))

    pixel_values = image_inputs(model_dir)
    encoded = tokenizer(RETRIEVAL_TEXTS, padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    if spec["image_tokens"]:
        placeholders = torch.full((len(RETRIEVAL_TEXTS), spec["num_query_tokens"]), image_token_id)
        input_ids = torch.cat([placeholders, input_ids], dim=1)
        attention_mask = torch.cat([torch.ones_like(placeholders), attention_mask], dim=1)
    tensors = {"pixel_values": pixel_values}
    with torch.no_grad():
        vision = model.vision_model(pixel_values).last_hidden_state
        queries = model.qformer(
            query_embeds=model.query_tokens.expand(len(PHOTOS), -1, -1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        contrastive = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        tensors.update(
            vision_last_hidden_state=vision,
            qformer_last_hidden_state=queries,
            image_embeds=contrastive.image_embeds,
            text_embeds=contrastive.text_embeds,
            itc_similarity=contrastive.logits_per_image,
        )
        itm_logits = []
        for i in range(len(PHOTOS)):
            pixels = pixel_values[i : i + 1].expand(len(RETRIEVAL_TEXTS), -1, -1, -1)
            matching = model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask,
                             use_image_text_matching_head=True)
            itm_logits.append(matching.logits_per_image)
        itm_logits = torch.stack(itm_logits)  # [image, text, 2]
        tensors["itm_logits"] = itm_logits
        tensors["itm_probability"] = torch.softmax(itm_logits, dim=-1)[..., 1]

    # Rankings of the photos for each text: by contrastive similarity, and re-ranked as the original
    # BLIP-2 retrieval evaluation does (matching-head logit of "match", averaged over the queries,
    # plus the contrastive similarity).
    itc = tensors["itc_similarity"]
    rerank = tensors["itm_logits"][..., 1] + itc
    rankings = [
        dict(text=text, itc=torch.argsort(itc[:, t], descending=True).tolist(),
             rerank=torch.argsort(rerank[:, t], descending=True).tolist())
        for t, text in enumerate(RETRIEVAL_TEXTS)
    ]
    for t in range(len(RETRIEVAL_TEXTS)):
        gaps = torch.sort(itc[:, t], descending=True).values
        assert (gaps[:-1] - gaps[1:]).min() > 1e-4, f"{name}: near-tie in the ranking for text {t}"

    reference_dir = out / "reference"
    reference_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, reference_dir / f"{name}.safetensors")
    meta = dict(
        model=name,
        photos=PHOTOS,
        texts=RETRIEVAL_TEXTS,
        text_ids=[ids[: int(m.sum())] for ids, m in zip(encoded["input_ids"].tolist(), encoded["attention_mask"])],
        rankings=rankings,
    )
    (reference_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{name}: retrieval reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for index, (name, spec) in enumerate(MODELS.items()):
        # A fresh tokenizer each time: the processor adds `<image>` to the one it is given.
        record(name, spec, build_tokenizer(spec["family"]), args.out, seed=1000 + index)
    check_processor_round_trip(args.out)
    for index, (name, spec) in enumerate(RETRIEVAL_MODELS.items()):
        record_retrieval(name, spec, args.out, seed=2000 + index)


if __name__ == "__main__":
    main()
