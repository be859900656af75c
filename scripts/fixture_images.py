"""Make the image fixtures for the blip2-image crate and record the reference outputs.

Usage: /work/venv/bin/python scripts/fixture_images.py [OUT_DIR]   (default: tests/fixtures/images)

The reference is Hugging Face transformers' BLIP image processor on the PIL backend
(`BlipImageProcessorPil`), which decodes with Pillow and computes with numpy. Every expected
value written here comes from those libraries, at the versions pinned below:

- `inputs/`: small encoded images, one per mode/format case, made from the photos in `images/`
  shrunk to 48x36, plus the invalid files that the error tests open (`bad/`).
- `cases.safetensors`: for each case, `NAME.rgb` is the uint8 [H, W, 3] image after
  transformers' `convert_to_rgb`, preceded by `ImageOps.exif_transpose` when the case has EXIF.
  `NAME.resized` is that image after `Image.resize((24, 18), BICUBIC)`. The cases with EXIF
  orientation 6 also have `NAME.rgb_raw` (no transpose), and a few have `NAME.pixel_values`
  (float32 [3, 18, 24], from `BlipImageProcessorPil`).
- `resize.safetensors`: `FILTER.WxH` (uint8) for every PIL filter and several target sizes.
- `full.safetensors`: full-size photos: chelsea.png through the whole chain at 224x224
  (`BlipImageProcessorPil`'s float32 output) and rocket.jpg decoded and resized to 364x364
  (uint8). Only these two are stored, to keep the directory small.
- `preprocessor_config.json` and `processor_config.json`: the processor settings as
  transformers 5 writes them, flat and nested.
- `manifest.json`: what each case is (file, PIL mode, size, EXIF orientation) and the error
  Pillow raises for each invalid file.
"""

import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL
import safetensors
import transformers
from PIL import Image, ImageOps
from safetensors.numpy import save_file

PINNED = {"pillow": "13.0.0", "transformers": "5.23.0", "numpy": "2.4.6", "safetensors": "0.8.0"}
FOUND = {
    "pillow": PIL.__version__,
    "transformers": transformers.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}
if FOUND != PINNED:
    sys.exit(f"fixture_images.py needs {PINNED}, found {FOUND}; use the pinned virtual environment")

from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "images"
SMALL = (48, 36)
CASE_RESIZE = (24, 18)

out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "images"
inputs = out_dir / "inputs"
bad = out_dir / "bad"
inputs.mkdir(parents=True, exist_ok=True)
bad.mkdir(parents=True, exist_ok=True)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, array: np.ndarray, bit_depth: int, color_type: int, trns: bytes = b"") -> None:
    """Write a PNG by hand, for layouts Pillow cannot save: 16-bit RGB, RGBA and LA, 2-bit gray,
    and 16-bit RGB with a tRNS color. `array` has one sample per element."""
    height, width = array.shape[:2]
    samples = array.reshape(height, -1)
    if bit_depth == 16:
        rows = [row.astype(">u2").tobytes() for row in samples]
    elif bit_depth == 8:
        rows = [row.astype(np.uint8).tobytes() for row in samples]
    else:
        per_byte = 8 // bit_depth
        rows = []
        for row in samples:
            padded = np.concatenate([row, np.zeros((-len(row)) % per_byte, row.dtype)]).reshape(-1, per_byte)
            shifts = bit_depth * np.arange(per_byte - 1, -1, -1)
            rows.append((padded.astype(np.uint16) << shifts).sum(axis=1).astype(np.uint8).tobytes())
    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    if trns:
        data += png_chunk(b"tRNS", trns)
    data += png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")
    path.write_bytes(data)


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def shrink(name: str) -> Image.Image:
    return Image.open(PHOTOS / name).convert("RGB").resize(SMALL, Image.Resampling.LANCZOS)


base = shrink("chelsea.png")
gray = shrink("camera.png").convert("L")
xs = np.arange(SMALL[0])[None, :]
ys = np.arange(SMALL[1])[:, None]
# Alpha that sweeps 0..255 across the image, with a fully transparent and a fully opaque band.
alpha = ((xs * 255) // (SMALL[0] - 1) + 0 * ys).astype(np.uint8)
alpha[:4, :] = 0
alpha[-4:, :] = 255
alpha_image = Image.fromarray(alpha)

rgba = base.copy()
rgba.putalpha(alpha_image)
la = gray.copy()
la.putalpha(alpha_image)
palette = base.quantize(64)
gray16 = (np.asarray(gray).astype(np.uint16) * 3 + (xs * 7).astype(np.uint16)) % 1024
rgb16 = np.asarray(base).astype(np.uint16) * 257 + (xs[..., None] * 3).astype(np.uint16)
rgba16 = np.concatenate([rgb16, (alpha.astype(np.uint16) * 257)[..., None]], axis=-1)
la16 = np.stack([np.asarray(gray).astype(np.uint16) * 251, alpha.astype(np.uint16) * 257], -1)

cases = []  # (name, file name, writer, expected PIL mode, EXIF orientation or None, pixel values?)


def case(name, file_name, write, mode, orientation=None, pixel_values=False):
    cases.append((name, file_name, write, mode, orientation, pixel_values))


def saver(image, **params):
    return lambda path: image.save(path, **params)


case("png_rgb", "rgb.png", saver(base), "RGB", pixel_values=True)
case("png_rgba", "rgba.png", saver(rgba), "RGBA", pixel_values=True)
case("png_la", "la.png", saver(la), "LA")
case("png_l", "l.png", saver(gray), "L")
case("png_1bit", "1bit.png", saver(gray.convert("1")), "1")
case("png_p", "p.png", saver(palette), "P")
case("png_p_trns_index", "p_trns_index.png", saver(palette, transparency=3), "P")
case(
    "png_p_trns_alpha",
    "p_trns_alpha.png",
    saver(palette, transparency=bytes((i * 4) % 256 for i in range(64))),
    "P",
    pixel_values=True,
)
trns_rgb = tuple(int(v) for v in np.asarray(base)[10, 10])
case("png_rgb_trns", "rgb_trns.png", saver(base, transparency=trns_rgb), "RGB")
case("png_l_trns", "l_trns.png", saver(gray, transparency=int(np.asarray(gray)[5, 5])), "L")
case("png_i16", "i16.png", saver(Image.fromarray(gray16)), "I;16")
case(
    "png_i16_trns",
    "i16_trns.png",
    saver(Image.fromarray(gray16), transparency=int(gray16[5, 5])),
    "I;16",
)
case("png_rgb16", "rgb16.png", lambda p: write_png(p, rgb16, 16, 2), "RGB")
# Pillow compares its 8-bit pixels (the high bytes) with the low bytes of a 16-bit tRNS color.
trns_rgb16 = rgb16[3, 4]
trns_rgb16_low = np.asarray(base)[20, 30] + np.array([0x100, 0x200, 0x300])
case("png_rgb16_trns", "rgb16_trns.png", lambda p: write_png(p, rgb16, 16, 2, trns_rgb16.astype(">u2").tobytes()), "RGB")
case(
    "png_rgb16_trns_low",
    "rgb16_trns_low.png",
    lambda p: write_png(p, rgb16, 16, 2, trns_rgb16_low.astype(">u2").tobytes()),
    "RGB",
)
gray2 = np.asarray(gray) >> 6
case("png_gray2_trns", "gray2_trns.png", lambda p: write_png(p, gray2, 2, 0, struct.pack(">H", 2)), "L")
case("png_rgba16", "rgba16.png", lambda p: write_png(p, rgba16, 16, 6), "RGBA")
case("png_la16", "la16.png", lambda p: write_png(p, la16, 16, 4), "RGBA")
case("png_exif6", "exif6.png", saver(base, exif=exif_with_orientation(6)), "RGB", orientation=6)
case("jpeg_baseline", "baseline.jpg", saver(base, quality=90), "RGB")
case("jpeg_444", "s444.jpg", saver(base, quality=90, subsampling=0), "RGB")
case("jpeg_progressive", "progressive.jpg", saver(base, quality=85, progressive=True), "RGB")
case("jpeg_gray", "gray.jpg", saver(gray, quality=90), "L")
case("jpeg_cmyk", "cmyk.jpg", saver(base.convert("CMYK"), quality=90), "CMYK", pixel_values=True)
for value in range(1, 9):
    case(
        f"jpeg_exif{value}",
        f"exif{value}.jpg",
        saver(base, quality=90, exif=exif_with_orientation(value)),
        "RGB",
        orientation=value,
    )
case("webp_lossless", "lossless.webp", saver(base, lossless=True), "RGB")
case("webp_lossless_alpha", "lossless_alpha.webp", saver(rgba, lossless=True), "RGBA")
case("webp_lossy", "lossy.webp", saver(base, quality=80), "RGB")
case("webp_lossy_alpha", "lossy_alpha.webp", saver(rgba, quality=80), "RGBA")
case("gif", "p.gif", saver(palette), "P")
case("gif_trns", "p_trns.gif", saver(palette, transparency=3), "P")
second_frame = base.transpose(Image.Transpose.ROTATE_180).quantize(64)
case("gif_animated", "animated.gif", saver(palette, save_all=True, append_images=[second_frame]), "P")
case("bmp_rgb", "rgb.bmp", saver(base), "RGB")
case("bmp_rgba32", "rgba32.bmp", saver(rgba), "RGB")
case("bmp_l", "l.bmp", saver(gray), "L")
case("bmp_p", "p.bmp", saver(palette), "P")
case("tiff_rgb", "rgb.tiff", saver(base), "RGB")
case("tiff_rgba_lzw", "rgba_lzw.tiff", saver(rgba, compression="tiff_lzw"), "RGBA")
case("tiff_l_deflate", "l_deflate.tiff", saver(gray, compression="tiff_adobe_deflate"), "L")
case("tiff_cmyk", "cmyk.tiff", saver(base.convert("CMYK")), "CMYK")

case_tensors = {}
manifest_cases = []
for name, file_name, write, mode, orientation, want_pixel_values in cases:
    path = inputs / file_name
    write(path)
    opened = Image.open(path)
    opened.load()
    if opened.mode != mode:
        sys.exit(f"{name}: Pillow opened {file_name} as mode {opened.mode}, expected {mode}")
    found_orientation = opened.getexif().get(0x0112)
    if found_orientation != orientation:
        sys.exit(f"{name}: EXIF orientation {found_orientation}, expected {orientation}")

    upright = ImageOps.exif_transpose(opened) if orientation else opened
    rgb = convert_to_rgb(upright, return_numpy=True)
    resized = np.asarray(Image.fromarray(rgb).resize(CASE_RESIZE, Image.Resampling.BICUBIC))
    case_tensors[f"{name}.rgb"] = np.ascontiguousarray(rgb)
    case_tensors[f"{name}.resized"] = np.ascontiguousarray(resized)
    if orientation == 6:
        case_tensors[f"{name}.rgb_raw"] = np.ascontiguousarray(convert_to_rgb(opened, return_numpy=True))
    if want_pixel_values:
        processor = BlipImageProcessorPil(size={"height": CASE_RESIZE[1], "width": CASE_RESIZE[0]})
        values = processor(images=upright, return_tensors="np")["pixel_values"][0]
        case_tensors[f"{name}.pixel_values"] = np.ascontiguousarray(values.astype(np.float32))
    manifest_cases.append(
        {
            "name": name,
            "file": f"inputs/{file_name}",
            "pil_mode": opened.mode,
            "format": opened.format,
            "width": opened.size[0],
            "height": opened.size[1],
            "exif_orientation": orientation,
            "has_pixel_values": want_pixel_values,
        }
    )
save_file(case_tensors, out_dir / "cases.safetensors")

# Every PIL filter, downscaling, upscaling, mixed and unchanged sizes, on an RGB image.
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# (40, 10) and (47, 30) take Pillow 13's vertical-first pass order, because the height shrinks
# by more than twice what the width does. (44, 28) is on the boundary and stays horizontal-first.
RESIZE_TARGETS = [(30, 22), (61, 47), (17, 53), (48, 36), (1, 1), (40, 10), (47, 30), (44, 28)]
base.save(inputs / "resize_source.png")
resize_tensors = {}
for filter_name, filter_id in FILTERS.items():
    for width, height in RESIZE_TARGETS:
        resized = base.resize((width, height), filter_id, reducing_gap=None)
        resize_tensors[f"{filter_name}.{width}x{height}"] = np.ascontiguousarray(np.asarray(resized))
save_file(resize_tensors, out_dir / "resize.safetensors")

# Full-size photos. The 224x224 chain of chelsea.png is BlipImageProcessorPil's own output; the
# rocket.jpg entry is the uint8 image after convert_to_rgb and Image.resize(..., BICUBIC).
full_tensors = {}
processor_224 = BlipImageProcessorPil(size={"height": 224, "width": 224})
with Image.open(PHOTOS / "chelsea.png") as photo:
    full_tensors["chelsea.pixel_values.224"] = np.ascontiguousarray(
        processor_224(images=photo, return_tensors="np")["pixel_values"][0].astype(np.float32)
    )
FULL_RESIZES = [("rocket.jpg", 364)]
for file_name, side in FULL_RESIZES:
    with Image.open(PHOTOS / file_name) as photo:
        rgb = convert_to_rgb(photo, return_numpy=True)
    resized = np.asarray(Image.fromarray(rgb).resize((side, side), Image.Resampling.BICUBIC))
    full_tensors[f"{Path(file_name).stem}.resized.{side}"] = np.ascontiguousarray(resized)
save_file(full_tensors, out_dir / "full.safetensors")

# Processor settings, flat (preprocessor_config.json) and nested (processor_config.json).
settings = BlipImageProcessorPil(size={"height": 224, "width": 224}).to_dict()
(out_dir / "preprocessor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
nested = {"image_processor": settings, "num_query_tokens": 32, "processor_class": "Blip2Processor"}
(out_dir / "processor_config.json").write_text(json.dumps(nested, indent=2, sort_keys=True) + "\n")

# Invalid files, with the error Pillow raises on each.
png_bytes = (inputs / "rgb.png").read_bytes()
jpeg_bytes = (inputs / "baseline.jpg").read_bytes()
huge_header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
huge_png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", huge_header)
huge_png += png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")
BAD = {
    "empty.png": b"",
    "text.png": b"This is a text file, not an image.\n",
    "truncated.png": png_bytes[: len(png_bytes) * 2 // 3],
    "truncated.jpg": jpeg_bytes[: len(jpeg_bytes) * 2 // 3],
    "huge.png": huge_png,
}
manifest_bad = []
for file_name, data in BAD.items():
    (bad / file_name).write_bytes(data)
    try:
        with Image.open(bad / file_name) as image:
            image.load()
        error = None
    except Exception as exc:  # noqa: BLE001 - the message is the recorded reference
        error = f"{type(exc).__name__}: {exc}".replace(str(bad), "bad")
    if error is None:
        sys.exit(f"Pillow opened the invalid file {file_name} without an error")
    manifest_bad.append({"file": f"bad/{file_name}", "pil_error": error})

manifest = {
    "versions": FOUND,
    "case_resize": {"width": CASE_RESIZE[0], "height": CASE_RESIZE[1]},
    "cases": manifest_cases,
    "resize_filters": {name: int(value) for name, value in FILTERS.items()},
    "resize_targets": [{"width": w, "height": h} for w, h in RESIZE_TARGETS],
    "full_resizes": [{"file": f"images/{f}", "size": s} for f, s in FULL_RESIZES],
    "bad_inputs": manifest_bad,
}
(out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
print(f"wrote {len(manifest_cases)} cases to {out_dir}")
