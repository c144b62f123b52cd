"""Calibration data as users have it: one stacked .npy/.npz file, a folder of images with a
declared preprocessing, `max_samples` and `shuffle_seed`.  Each form calibrates exactly
like the folder of per-sample files holding the same arrays; streaming never holds the
whole set; every refusal is one line with its exit code."""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import calibration_folder, conv_bn_relu_model, make_model, two_input_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from corpus import DATA, USAGE, assert_clean_failure, invoke, save_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from quantizer import (
    CalibrationDataError,
    Calibrator,
    UsageError,
    optimize_model,
    quantize_model,
)
from quantizer.calibration_state import load_ranges
from quantizer.dataset import (
    DataOptions,
    DataSource,
    DataSpec,
    ImagePreprocessing,
    InputSpec,
    count_samples,
    input_specs,
    iter_samples,
)

try:  # the images extra; the other forms need no Pillow
    from PIL import Image
except ImportError:
    Image = None
needs_pillow = pytest.mark.skipif(Image is None, reason="Pillow (the images extra) is not installed")

FILES = sorted(SAMPLE_CALIB.glob("*.npy"))
ROWS = np.concatenate([np.load(p) for p in FILES])  # the 64 float32[1, 1, 8, 8] samples as [64, 1, 8, 8]
STAGE1 = optimize_model(SAMPLE_MODEL)
SPECS = input_specs(onnx.load(SAMPLE_MODEL))  # input float32[N, 1, 8, 8]
METHODS = ("min_max_asym", "entropy_asym", "percentile_sym")
F32 = np.dtype(np.float32)


def calibrate(model, data):
    """(samples seen, {method: ranges}) of one calibration pass over ``data``."""
    calibrator = Calibrator(model, METHODS[0], show_progress=False, keep_histograms=True)
    calibrator.collect_data(data)
    return calibrator.samples_seen, {m: calibrator.compute_range(m) for m in METHODS}


BASELINE = calibrate(STAGE1, SAMPLE_CALIB)


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return fixed


def tiny_cnn(shape, nhwc: bool = False) -> onnx.ModelProto:
    """x (NCHW, or NHWC transposed first) -> Conv -> Relu -> GlobalAveragePool -> Flatten."""
    channels = shape[3] if nhwc else shape[1]
    rng = np.random.default_rng(3)
    weights = numpy_helper.from_array(rng.normal(0, 0.5, (4, channels, 3, 3)).astype(np.float32), "w")
    nodes, first = [], "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], name="to_nchw", perm=[0, 3, 1, 2]))
        first = "xt"
    nodes += [
        helper.make_node("Conv", [first, "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape[0], 4])], [weights])


def save_stack(path: Path, form: str, array: np.ndarray, key: str = "x") -> Path:
    """``array`` as a stacked file: .npy, .npz (stored) or .npz compressed."""
    if form == "npy":
        np.save(path, array)
    elif form == "npz":
        np.savez(path, **{key: array})
    else:
        np.savez_compressed(path, **{key: array})
    return path


# -- stacked files -----------------------------------------------------------------------

@pytest.mark.parametrize("form", ["npy", "npz", "npz_compressed"])
def test_a_stacked_file_calibrates_like_the_folder(tmp_path, form):
    path = save_stack(tmp_path / f"stack.{form[:3]}", form, ROWS, key="input")
    assert calibrate(STAGE1, path) == BASELINE  # the path itself (what a plain DataSource streams)
    assert calibrate(STAGE1, DataSource(DataSpec(path, DataOptions(shuffle_seed=4))).stream()) == BASELINE
    source = DataSource(path)
    sample, name = source.first(SPECS)
    assert name == f"{path.name}[0]" and sample["input"].shape == (1, 1, 8, 8)
    assert np.array_equal(sample["input"], ROWS[:1])


def test_the_pipeline_calibrates_a_stacked_file_like_the_folder(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS)
    from_folder = quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False)
    from_stack = quantize_model(SAMPLE_MODEL, tmp_path / "stack.npy", show_progress=False, report_samples=2)
    assert from_stack.ranges == from_folder.ranges
    assert from_stack.summary["calibration"]["samples"] == 64


def test_a_fixed_batch_takes_that_many_rows_per_sample(tmp_path):
    model = optimize_model(with_batch(onnx.load(SAMPLE_MODEL), 2))
    pairs = calibration_folder(tmp_path, {f"pair_{i:02d}.npy": ROWS[2 * i:2 * i + 2] for i in range(32)})
    np.save(tmp_path / "stack.npy", ROWS)
    np.savez(tmp_path / "stack.npz", input=ROWS)
    expected = calibrate(model, pairs)
    assert expected[0] == 32
    assert calibrate(model, tmp_path / "stack.npy") == expected
    assert calibrate(model, tmp_path / "stack.npz") == expected
    specs = input_specs(model)
    names = [name for name, sample in DataSource(tmp_path / "stack.npy").named_samples(specs, 3)]
    assert names == ["stack.npy[0]", "stack.npy[1]", "stack.npy[2]"]
    second = DataSource(tmp_path / "stack.npy", shuffle_seed=1).first(specs)
    index = int(second[1].split("[")[1].rstrip("]"))
    assert np.array_equal(second[0]["input"], ROWS[2 * index:2 * index + 2])


def test_a_stacked_npz_feeds_every_input(tmp_path):
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(6, 3, 4, 5)).astype(np.float32) for _ in range(2))
    folder = calibration_folder(tmp_path, {f"s{i}.npz": {"a": a[i:i + 1], "b": b[i:i + 1]} for i in range(6)})
    np.savez(tmp_path / "stack.npz", a=a, b=b)
    model = optimize_model(two_input_model())
    assert calibrate(model, tmp_path / "stack.npz") == calibrate(model, folder)


@settings(max_examples=60, deadline=None)
@given(batch=st.sampled_from([None, 1, 2, 3]), count=st.integers(1, 9),
       form=st.sampled_from(["npy", "npz", "npz_compressed"]), fortran=st.booleans(), big_endian=st.booleans(),
       max_samples=st.none() | st.integers(1, 12), seed=st.none() | st.integers(0, 2**32))
def test_the_samples_of_a_stacked_file_are_its_rows(batch, count, form, fortran, big_endian, max_samples, seed):
    per = batch or 1
    rows = np.arange(count * per * 6, dtype=np.float32).reshape(count * per, 2, 3) / 4
    stored = np.asfortranarray(rows) if fortran else rows
    stored = stored.astype(">f4") if big_endian else stored
    spec = [InputSpec("x", F32, (batch or "N", 2, 3))]
    with tempfile.TemporaryDirectory() as folder:
        path = save_stack(Path(folder) / f"stack.{form[:3]}", form, stored)
        source = DataSource(path, max_samples=max_samples, shuffle_seed=seed)
        got = list(source.named_samples(spec, None))
        indices = [int(name[len(path.name) + 1:-1]) for name, _ in got]
        assert len(got) == min(count, max_samples or count)
        if seed is None:
            assert indices == list(range(len(got)))
        else:  # a permutation, the same for the same seed, and max_samples takes its start
            assert len(set(indices)) == len(indices) and set(indices) <= set(range(count))
            full = [name for name, _ in DataSource(path, shuffle_seed=seed).named_samples(spec, None)]
            assert [name for name, _ in got] == full[:len(got)]
        for index, (name, sample) in zip(indices, got):
            assert sample["x"].dtype == F32 and sample["x"].shape == (per, 2, 3)
            assert np.array_equal(sample["x"], rows[index * per:(index + 1) * per])
        first_sample, first_name = source.first(spec)
        assert first_name == got[0][0] and np.array_equal(first_sample["x"], got[0][1]["x"])
        plain = max_samples is None and seed is None  # streamed as the path: rows per sample need the model
        assert count_samples(source.stream()) == (None if plain else len(got))
        streamed = list(iter_samples(source.stream(), spec))
        assert all(np.array_equal(s["x"], g["x"]) for s, (_, g) in zip(streamed, got)) and len(streamed) == len(got)


@pytest.mark.parametrize("form, seed", [("npy", None), ("npy", 5), ("npz", 5), ("npz_compressed", None),
                                        ("npz_compressed", 5)])
def test_streaming_a_stacked_file_never_holds_it(tmp_path, form, seed):
    rows = 8192
    array = np.random.default_rng(0).standard_normal((rows, 1, 32, 32), dtype=np.float32)  # 32 MiB
    path = save_stack(tmp_path / f"big.{form[:3]}", form, array)
    expected = float(array[:, 0, 0, 0].astype(np.float64).sum())
    size = array.nbytes
    del array
    spec = [InputSpec("x", F32, ("N", 1, 32, 32))]
    source = DataSource(DataSpec(path, DataOptions(shuffle_seed=seed)))
    tracemalloc.start()
    try:
        seen, total = 0, 0.0
        for sample in iter_samples(source.stream(), spec):
            seen += 1
            total += float(sample["x"][0, 0, 0, 0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == rows and total == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert peak < size / 16, f"peak {peak} bytes while streaming {size} bytes"


# -- max_samples and shuffle_seed ----------------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(max_samples=st.integers(1, 20), seed=st.none() | st.integers(0, 10**6))
def test_a_subset_calibrates_like_exactly_those_samples(max_samples, seed):
    source = DataSource(SAMPLE_CALIB, max_samples=max_samples, shuffle_seed=seed)
    names = [name for name, _ in source.named_samples(SPECS, None)]
    assert len(names) == max_samples and len(set(names)) == max_samples
    if seed is None:
        assert names == [p.name for p in FILES[:max_samples]]
    seen, ranges = calibrate(STAGE1, source.stream())
    assert seen == max_samples
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            shutil.copy(SAMPLE_CALIB / name, folder)
        assert calibrate(STAGE1, Path(folder))[1]["min_max_asym"] == ranges["min_max_asym"]
    chosen = np.stack([np.load(SAMPLE_CALIB / name) for name in names])
    assert ranges["min_max_asym"]["input"] == (min(float(chosen.min()), 0.0), max(float(chosen.max()), 0.0))
    assert calibrate(STAGE1, DataSource(SAMPLE_CALIB, max_samples=max_samples, shuffle_seed=seed).stream()) == \
        (seen, ranges)  # the same seed, the same samples in the same order


def test_shuffling_reads_no_sample(monkeypatch):
    from quantizer import dataset

    read = []
    original = dataset._read_npy
    monkeypatch.setattr(dataset, "_read_npy", lambda path, spec: read.append(path.name) or original(path, spec))
    source = DataSource(SAMPLE_CALIB, shuffle_seed=11, max_samples=5)
    names = [name for name, _ in source.named_samples(SPECS, None)]
    assert read == names and names != [p.name for p in FILES[:5]]
    read.clear()
    assert calibrate(STAGE1, source.stream())[0] == 5 and read == names


def test_the_options_apply_to_sequences_and_iterators():
    items = [np.load(p) for p in FILES[:10]]
    source = DataSource(items, max_samples=4, shuffle_seed=2)
    shuffled = [sample["input"] for _, sample in source.named_samples(SPECS, None)]
    assert len(shuffled) == 4 and len({a.tobytes() for a in shuffled}) == 4
    assert all(any(np.array_equal(a, b) for b in items) for a in shuffled)
    assert np.array_equal(source.first(SPECS)[0]["input"], shuffled[0])
    assert count_samples(source.stream()) == 4 and len(source.samples(2)) == 2
    assert [a.tobytes() for a in shuffled] != [a.tobytes() for a in items[:4]]

    taken = []

    def one_shot():
        for item in items:
            taken.append(1)
            yield item

    source = DataSource(one_shot(), keep=2, max_samples=3)
    assert source.first(SPECS)[1] == "0"
    assert calibrate(STAGE1, source.stream())[0] == 3 and len(taken) == 3
    assert [name for name, _ in source.named_samples(SPECS, 5)] == ["0", "1"]
    with pytest.raises(UsageError, match="`shuffle_seed` needs data that can be read in any order"):
        DataSource(iter(items), shuffle_seed=1)
    with pytest.raises(UsageError, match="`max_samples` must be a whole number >= 1"):
        DataSource(items, max_samples=0)
    with pytest.raises(UsageError, match="`shuffle_seed` must be a whole number >= 0"):
        DataOptions(shuffle_seed=-1)


def test_a_plain_path_streams_as_before(tmp_path):
    assert DataSource(SAMPLE_CALIB).stream() == SAMPLE_CALIB
    assert DataSource(DataSpec(str(SAMPLE_CALIB))).stream() == SAMPLE_CALIB
    assert [n for n, _ in DataSource(SAMPLE_CALIB).named_samples(SPECS, 3)] == [p.name for p in FILES[:3]]
    spec = DataSpec(SAMPLE_CALIB, DataOptions(max_samples=6))
    result = quantize_model(SAMPLE_MODEL, spec, show_progress=False, report_samples=2)
    assert result.summary["calibration"]["samples"] == 6
    assert count_samples(spec) == 6 and len(list(iter_samples(spec, SPECS))) == 6


# -- folders of images -------------------------------------------------------------------

def gradient(height: int, width: int, seed: int) -> np.ndarray:
    """An RGB uint8 image: ramps across and down, plus a little seeded noise."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 40, (height, width, 3))
    ramps = np.stack([cols * 215 // max(width - 1, 1), rows * 215 // max(height - 1, 1),
                      (rows + cols) * 215 // max(height + width - 2, 1)], axis=-1)
    return (ramps + noise).astype(np.uint8)


def image_folder(tmp_path, sizes=((8, 8), (12, 10), (20, 16), (9, 31)), suffixes=(".png", ".jpg", ".bmp", ".webp")):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, ((height, width), suffix) in enumerate(zip(sizes * 2, suffixes * 2)):
        Image.fromarray(gradient(height, width, index), "RGB").save(folder / f"img_{index:02d}{suffix}")
    return folder


def expected_arrays(folder, target, size, *, gray=False, bgr=False, scale=1 / 255, mean=(0.0,), std=(1.0,),
                    nchw=True):
    """The preprocessing computed independently: Pillow opens and resizes (the same filter),
    numpy does the rest; written as a folder of .npy samples."""
    target.mkdir()
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            image = image.convert("L" if gray else "RGB")
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = np.asarray(image).astype(np.float32).reshape(size[0], size[1], -1)
        if bgr:
            pixels = pixels[..., [2, 1, 0]]
        pixels = (pixels * np.float32(scale) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        if nchw:
            pixels = np.moveaxis(pixels, -1, 0)
        np.save(target / f"{path.stem}.npy", np.ascontiguousarray(pixels[np.newaxis], np.float32))
    return target


@needs_pillow
def test_an_image_folder_calibrates_like_its_arrays_grayscale(tmp_path):
    folder = image_folder(tmp_path)
    arrays = expected_arrays(folder, tmp_path / "arrays", (8, 8), gray=True)  # the model's fixed H, W; 1 channel
    assert calibrate(STAGE1, folder) == calibrate(STAGE1, arrays)
    sample, name = DataSource(folder).first(SPECS)
    assert name == "img_00.png" and sample["input"].shape == (1, 1, 8, 8) and sample["input"].dtype == F32


@needs_pillow
def test_an_image_folder_with_declared_preprocessing(tmp_path):
    folder = image_folder(tmp_path)
    model = optimize_model(conv_bn_relu_model())  # x: float32[N, 3, 8, 8]
    pre = ImagePreprocessing(channel_order="BGR", scale=1 / 127.5, mean=(1.0, 0.9, 0.8), std=(0.5, 0.6, 0.7))
    arrays = expected_arrays(folder, tmp_path / "arrays", (8, 8), bgr=True, scale=1 / 127.5, mean=(1.0, 0.9, 0.8),
                             std=(0.5, 0.6, 0.7))
    assert calibrate(model, DataSource(folder, images=pre).stream()) == calibrate(model, arrays)


@needs_pillow
def test_an_nhwc_model_with_dynamic_sizes_through_the_cli(tmp_path):
    folder = image_folder(tmp_path)
    model = tiny_cnn(("N", "H", "W", 3), nhwc=True)
    model_path = save_model(model, tmp_path)
    arrays = expected_arrays(folder, tmp_path / "arrays", (12, 14), scale=1 / 255, mean=(0.485, 0.456, 0.406),
                             std=(0.229, 0.224, 0.225), nchw=False)
    preprocess = tmp_path / "preprocess.toml"
    preprocess.write_text('size = [12, 14]\nlayout = "NHWC"\nscale = "1/255"\n'
                          "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(model_path, "--data", folder, "--preprocess", preprocess, "--save-ranges", out / "r.json",
                    "-o", out / "q.onnx", "-q")
    assert result.exit_code == 0, result.output
    expected = quantize_model(model, arrays, show_progress=False).ranges
    assert {k: tuple(v) for k, v in load_ranges(out / "r.json").items()} == expected
    # The same from flags, and from a JSON file whose values the flags change.
    (tmp_path / "p.json").write_text(json.dumps({"size": [12, 14], "mean": 0.5, "std": [0.229, 0.224, 0.225]}))
    result = invoke(model_path, "--data", folder, "--preprocess", tmp_path / "p.json", "--image-layout", "nhwc",
                    "--mean", "0.485,0.456,0.406", "--image-scale", "0.00392156862745098", "--save-ranges",
                    out / "r2.json", "-o", out / "q2.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert load_ranges(out / "r2.json") == load_ranges(out / "r.json")


def test_the_cli_options_reach_run_and_tune(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(SAMPLE_MODEL, "--data", tmp_path / "stack.npy", "--max-samples", 7, "--shuffle-seed", 3,
                    "--report", out / "run.json", "--report-samples", 2, "-o", out / "q.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["calibration"]["samples"] == 7
    script = tmp_path / "evaluate.py"
    script.write_text("def evaluate(model_path):\n    return 1.0\n")
    result = invoke("tune", SAMPLE_MODEL, "--data", SAMPLE_CALIB, "--max-samples", 5, "--eval", script,
                    "--max-trials", 1, "--report", out / "tune.json", "-o", out / "t.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tune.json").read_text())["calibration"]["samples"] == 5


def test_preprocessing_files_and_values(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('size = [224, 200]\nlayout = "nchw"\nchannel_order = "bgr"\nscale = "1/255"\nmean = 0.5\n')
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps({"size": "224x200", "layout": "NCHW", "channel_order": "BGR",
                                   "scale": 1 / 255, "mean": [0.5]}))
    expected = ImagePreprocessing(size=(224, 200), layout="NCHW", channel_order="BGR", mean=(0.5,))
    assert ImagePreprocessing.from_file(toml) == ImagePreprocessing.from_file(as_json) == expected
    assert DataOptions(images=toml).images == expected
    with pytest.raises(UsageError, match="p.toml: unknown key 'resize'"):
        toml.write_text("resize = [1, 2]\n")
        ImagePreprocessing.from_file(toml)
    with pytest.raises(UsageError, match="'std' in p.json must not be 0"):
        as_json.write_text('{"std": [1, 0, 1]}')
        ImagePreprocessing.from_file(as_json)
    with pytest.raises(UsageError, match="`images.size` must be two positive whole numbers"):
        ImagePreprocessing(size=(0, 3))
    with pytest.raises(UsageError, match="`images.layout` must be one of NCHW, NHWC"):
        ImagePreprocessing(layout="CHW")


# -- refusals: one line, the documented exit code, nothing written ---------------------------

def _stack_for_batch_two(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS[:63])
    return save_model(with_batch(onnx.load(SAMPLE_MODEL), 2), tmp_path), [tmp_path / "stack.npy"]


def _npz_rows_differ(tmp_path):
    np.savez(tmp_path / "stack.npz", a=np.zeros((4, 3, 4, 5), np.float32), b=np.zeros((3, 3, 4, 5), np.float32))
    return save_model(two_input_model(), tmp_path), [tmp_path / "stack.npz"]


def _images_without_size(tmp_path):
    return save_model(tiny_cnn(("N", 3, "H", "W")), tmp_path), [image_folder(tmp_path)]


def _ambiguous_folder(tmp_path):
    folder = image_folder(tmp_path, sizes=((8, 8),), suffixes=(".png", ".jpg"))
    for name in ("a.npy", "b.npy", "c.npz"):
        shutil.copy(FILES[0], folder / name)
    return SAMPLE_MODEL, [folder]


def _unknown_preprocess_key(tmp_path):
    (tmp_path / "p.toml").write_text("size = [8, 8]\nresize = true\n")
    return SAMPLE_MODEL, [image_folder(tmp_path), "--preprocess", tmp_path / "p.toml"]


def _image_options_for_arrays(tmp_path):
    return SAMPLE_MODEL, [SAMPLE_CALIB, "--image-size", "8,8"]


def _bad_image_size(tmp_path):
    return SAMPLE_MODEL, [image_folder(tmp_path), "--image-size", "8,eight"]


def _size_does_not_fit(tmp_path):
    return SAMPLE_MODEL, [image_folder(tmp_path), "--image-size", "16,16"]


def _stack_of_the_wrong_rank(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS[:, np.newaxis])
    return SAMPLE_MODEL, [tmp_path / "stack.npy"]


def _stack_of_the_wrong_dtype(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS.astype(np.float64))
    return SAMPLE_MODEL, [tmp_path / "stack.npy"]


def _corrupt_stack(tmp_path):
    (tmp_path / "stack.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return SAMPLE_MODEL, [tmp_path / "stack.npz"]


def _truncated_stack(tmp_path):
    np.save(tmp_path / "stack.npy", ROWS)
    data = (tmp_path / "stack.npy").read_bytes()
    (tmp_path / "stack.npy").write_bytes(data[:-100])
    return SAMPLE_MODEL, [tmp_path / "stack.npy"]


REFUSALS = {
    # case: (maker, exit code, text)
    "rows_not_a_multiple": (_stack_for_batch_two, DATA,
                            "stack.npy: 63 rows of input 'input' are not a multiple of the model's batch size 2"),
    "npz_row_counts_differ": (_npz_rows_differ, DATA, "stack.npz: the inputs have different row counts ('a' 4, 'b' 3)"),
    "images_need_a_size": (_images_without_size, USAGE, "its height and width are not fixed; give --image-size (H, W)"),
    "ambiguous_folder": (_ambiguous_folder, DATA, "holds 2 image(s) and 3 .npy/.npz file(s)"),
    "unknown_preprocess_key": (_unknown_preprocess_key, USAGE, "p.toml: unknown key 'resize'"),
    "image_options_for_arrays": (_image_options_for_arrays, USAGE,
                                 "image preprocessing (--preprocess/--image-*) applies to a folder of images"),
    "bad_image_size": (_bad_image_size, USAGE, "--image-size must be two positive whole numbers H, W"),
    "size_does_not_fit": (_size_does_not_fit, USAGE, "--image-size 16,16 does not fit input 'input' float32[?,1,8,8]"),
    "stack_of_the_wrong_rank": (_stack_of_the_wrong_rank, DATA, "the stacked array is float32[64,1,1,8,8] (wrong rank"),
    "stack_of_the_wrong_dtype": (_stack_of_the_wrong_dtype, DATA,
                                 "stack.npy: input 'input' expects float32[?,1,8,8], given float64[1,1,8,8] (wrong dtype)"),
    "corrupt_stack": (_corrupt_stack, DATA, "cannot read calibration file stack.npz: not a .npz file of plain arrays"),
    "truncated_stack": (_truncated_stack, DATA, "cannot read calibration file stack.npy: truncated"),
    "stacked_file_missing": (lambda t: (SAMPLE_MODEL, [t / "nowhere.npy"]), DATA, "calibration file not found"),
}


def test_the_size_limit_is_per_sample_not_per_file(tmp_path, monkeypatch):
    from quantizer import dataset

    monkeypatch.setattr(dataset, "MAX_SAMPLE_BYTES", 4096)
    np.save(tmp_path / "stack.npy", np.zeros((64, 1, 32, 32), np.float32))  # 256 KiB, 4 KiB per sample
    assert len(list(iter_samples(tmp_path / "stack.npy", [InputSpec("x", F32, ("N", 1, 32, 32))]))) == 64
    with pytest.raises(CalibrationDataError, match=r"stack.npy: input 'x' declares shape \(2, 1, 32, 32\)"):
        next(iter_samples(tmp_path / "stack.npy", [InputSpec("x", F32, (2, 1, 32, 32))]))


IMAGE_CASES = {"images_need_a_size", "ambiguous_folder", "unknown_preprocess_key", "bad_image_size", "size_does_not_fit"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_pillow) if c in IMAGE_CASES else c for c in REFUSALS])
def test_refusals_through_the_cli(tmp_path, case):
    make, code, text = REFUSALS[case]
    model, data_args = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(model, "--data", *data_args, "-o", out / "q.onnx")
    assert_clean_failure(result, code, text, out)


@needs_pillow
def test_without_pillow_an_image_folder_says_how_to_install_it(tmp_path, monkeypatch):
    folder = image_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now fails
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(SAMPLE_MODEL, "--data", folder, "-o", out / "q.onnx")
    assert_clean_failure(result, USAGE, "needs Pillow: pip install onnx-int8-quantizer[images]", out)
    with pytest.raises(UsageError, match=r"pip install onnx-int8-quantizer\[images\]"):
        quantize_model(SAMPLE_MODEL, folder, show_progress=False)


def test_data_options_need_data(tmp_path):
    ranges = tmp_path / "ranges.json"
    ranges.write_text(json.dumps(quantize_model(SAMPLE_MODEL, SAMPLE_CALIB, show_progress=False).ranges))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(SAMPLE_MODEL, "--ranges", ranges, "--max-samples", 3, "-o", out / "q.onnx")
    assert_clean_failure(result, USAGE, "--max-samples need --data", out)


@needs_pillow
def test_the_api_raises_the_same_errors(tmp_path):
    model, (path,) = _stack_for_batch_two(tmp_path)
    with pytest.raises(CalibrationDataError, match="63 rows of input 'input' are not a multiple"):
        quantize_model(model, path, show_progress=False)
    with pytest.raises(UsageError, match="give `images.size`"):
        quantize_model(tiny_cnn(("N", 3, "H", "W")), image_folder(tmp_path), show_progress=False)
    with pytest.raises(UsageError, match="image preprocessing .`images`. applies to a folder of images"):
        DataSource([np.zeros((1, 1, 8, 8), np.float32)], images=ImagePreprocessing())


# -- the accuracy steps' samples -------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 40), n=st.integers(1, 6), seed=st.none() | st.integers(0, 10**6),
       form=st.sampled_from(["folder", "stack", "list", "iterator"]), max_samples=st.none() | st.integers(1, 30))
def test_the_accuracy_samples_spread_over_the_whole_source(count, n, seed, form, max_samples):
    seed = None if form == "iterator" else seed  # a one-shot iterator cannot be shuffled
    rows = np.arange(count * 6, dtype=np.float32).reshape(count, 1, 2, 3)
    spec = [InputSpec("x", F32, ("N", 2, 3))]
    with tempfile.TemporaryDirectory() as folder:
        if form == "folder":
            data = calibration_folder(Path(folder), {f"s{i:02d}.npy": rows[i] for i in range(count)})
        elif form == "stack":
            data = save_stack(Path(folder) / "stack.npy", "npy", rows[:, 0])
        else:
            data = [{"x": row} for row in rows]
        everything = [sample["x"] for _, sample in
                      DataSource(data, shuffle_seed=seed, max_samples=max_samples).named_samples(spec, None)]
        source = DataSource(iter(data) if form == "iterator" else data, shuffle_seed=seed, max_samples=max_samples,
                            spread=n)
        if form == "iterator":  # calibration reads the stream first; the picks are kept as it passes
            assert sum(1 for _ in iter_samples(source.stream(), spec)) == len(everything)
        spread = [sample["x"] for _, sample in source.spread_samples(spec, n)]
    # brute force: every stride-th sample, the smallest power-of-two stride leaving <= 2n,
    # then the k-th pick nearest to k (m - 1) / (n - 1) among those m (halves up)
    total = len(everything)
    stride = next(2 ** e for e in range(64) if math.ceil(total / 2 ** e) <= 2 * n)
    kept = list(range(0, total, stride))
    m = len(kept)
    picks = range(m) if m <= n else (
        [0] if n == 1 else sorted({math.floor(Fraction(k * (m - 1), n - 1) + Fraction(1, 2)) for k in range(n)}))
    wanted = [kept[j] for j in picks]
    assert len(spread) == min(n, total)
    assert all(np.array_equal(got, everything[i]) for got, i in zip(spread, wanted))
    if 1 < total <= 2 * n and n > 1:  # first and last are both measured
        assert np.array_equal(spread[0], everything[0]) and np.array_equal(spread[-1], everything[-1])
