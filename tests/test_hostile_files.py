"""Hostile files: calibration data, calibration states and ranges that are malformed,
tampered with, or built to exhaust memory.

Each is refused with one line (through the API: the error class of its exit code; through
the CLI: that exit code, one line, no traceback, nothing left in the output directory),
before any large allocation, and never with numpy's advice to pass allow_pickle.  The
harmless variants (big-endian floats, numpy strings for string inputs, Fortran order) are
accepted.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import resource
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import calibration_folder as folder_with
from click.testing import CliRunner
from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from quantizer.cli.main import cli

from quantizer import (
    CalibrationDataError,
    Calibrator,
    QuantizerError,
    UsageError,
    dataset,
    optimize_model,
    quantize_model,
)
from quantizer.calibration_state import load_ranges, load_state
from quantizer.dataset import InputSpec, iter_folder

USAGE, DATA = 2, 4
SPECS = [InputSpec("input", np.dtype(np.float32), ("N", 1, 8, 8))]
CALIB_FILES = sorted(SAMPLE_CALIB.glob("*.npy"))
SAMPLE = np.load(CALIB_FILES[0])  # float32[1, 1, 8, 8]
HOSTILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- helpers ---------------------------------------------------------------------------

def npy_header(shape, dtype, version=1) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    (np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0)(buffer, header)
    return buffer.getvalue()


class Entry:
    """One zip entry: its deflated bytes, CRC and the uncompressed size it declares."""

    def __init__(self, name: str, compressed: bytes, crc: int, size: int):
        self.name, self.compressed, self.crc, self.size = name, compressed, crc, size

    @classmethod
    def of(cls, name: str, raw: bytes, declared_size: int | None = None) -> Entry:
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        size = len(raw) if declared_size is None else declared_size
        return cls(name, co.compress(raw) + co.flush(), zlib.crc32(raw[:size]), size)  # the CRC of what is declared


_ZERO_CHUNK = 1 << 22


def zeros_entry(name: str, shape, dtype=np.float32) -> Entry:
    """An entry that really holds np.save(np.zeros(shape, dtype)), sizes and CRC right,
    made without holding the data: after a full flush deflate emits the same block for
    every further chunk of zeros, so 1 GiB of zeros is one ~4 KB block repeated."""
    header = npy_header(shape, dtype)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    full, rest = divmod(nbytes, _ZERO_CHUNK)
    zeros = bytes(_ZERO_CHUNK)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)]
    blocks = [co.compress(zeros) + co.flush(zlib.Z_FULL_FLUSH) for _ in range(min(full, 2))]
    assert len(set(blocks)) <= 1  # the repetition this relies on
    parts += blocks + blocks[:1] * (full - len(blocks))
    parts.append(co.compress(bytes(rest)) + co.flush())
    crc = zlib.crc32(header)
    for _ in range(full):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    return Entry(name, b"".join(parts), crc, len(header) + nbytes)


def write_zip(path: Path, entries: list[Entry]) -> Path:
    """A plain (non-zip64) zip of deflated entries, sizes as each entry declares them."""
    local, central = bytearray(), bytearray()
    for e in entries:
        name = e.name.encode()
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, e.crc, len(e.compressed), e.size,
                             len(name), 0) + name + e.compressed
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, e.crc, len(e.compressed),
                               e.size, len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def npy_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()




def assert_one_line(message: str, text: str) -> None:
    assert text in message, message
    assert "\n" not in message and "allow_pickle" not in message and "Traceback" not in message, message


def assert_clean_cli_failure(result, code: int, text: str, out_dir: Path) -> None:
    """Exit ``code``, exactly one non-empty output line holding ``text``, no traceback,
    nothing (not even a temporary .file) left in ``out_dir``."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert_one_line(lines[0], text)
    assert lines[0].startswith("error: "), lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert list(out_dir.iterdir()) == [], list(out_dir.iterdir())


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def out_dir(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


# -- calibration data: a small file that inflates to a gigabyte ------------------------

@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory):
    """A 1 MB .npz whose entry really inflates to a 1 GiB float32[16384, 16384]."""
    folder = tmp_path_factory.mktemp("bomb")
    write_zip(folder / "bomb.npz", [zeros_entry("input.npy", (16384, 16384))])
    return folder


def test_inflating_npz_is_refused_before_its_data_is_read(bomb_folder):
    path = bomb_folder / "bomb.npz"
    assert path.stat().st_size < 2 << 20
    with zipfile.ZipFile(path) as archive:  # a well-formed zip that declares the whole GiB
        assert archive.infolist()[0].file_size == len(npy_header((16384, 16384), np.float32)) + 2**30
    model = onnx.load(SAMPLE_MODEL)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationDataError) as info:
            quantize_model(model, bomb_folder, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line(str(info.value), "bomb.npz: input 'input' expects float32[?,1,8,8], given float32[16384,16384] (wrong rank)")
    assert info.value.exit_code == DATA
    assert peak < 50 << 20, peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 << 10


def test_inflating_npz_cli(bomb_folder, out_dir):
    result = invoke(SAMPLE_MODEL, "--data", bomb_folder, "-o", out_dir / "q.onnx", "--save-calibration", out_dir / "s.npz")
    assert_clean_cli_failure(result, DATA, "given float32[16384,16384] (wrong rank)", out_dir)


def test_inflating_npz_of_the_right_shape_is_refused_over_the_limit(tmp_path, monkeypatch):
    """The same 1 GiB of zeros as float32[2**22, 1, 8, 8] fits the input: with the limit
    just below 1 GiB it is refused by its header, not read."""
    folder = tmp_path / "calib"
    folder.mkdir()
    write_zip(folder / "big.npz", [zeros_entry("input.npy", (2**22, 1, 8, 8))])
    monkeypatch.setattr(dataset, "MAX_SAMPLE_BYTES", 2**30 - 1)
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationDataError) as info:
            next(iter_folder(folder, SPECS))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line(str(info.value), "big.npz: input 'input' declares shape (4194304, 1, 8, 8) of float32 = 1073741824 "
                                     "bytes, over the 1073741823 bytes limit for one calibration array")
    assert peak < 50 << 20, peak


# -- calibration data: a corpus of hostile files ---------------------------------------

def _header_only(shape, dtype=np.float32, tail=64):
    return npy_header(shape, dtype) + bytes(tail)


def _zip_of(*entries):
    return lambda path: write_zip(path, list(entries))


def _duplicate_entries(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: that is the point
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("input.npy", npy_bytes(SAMPLE))
            archive.writestr("input.npy", npy_bytes(SAMPLE * 2))


_SAMPLE_NPY = npy_bytes(SAMPLE)
_HUGE_HEADER = npy_header((1,) * 4000, np.float32, version=2) + bytes(4)  # numpy's message here advises allow_pickle
DATA_CASES = {
    "over_limit_npy": ({"a.npy": _header_only((2**26, 1, 8, 8))},
                       ("a.npy: input 'input' declares shape (67108864, 1, 8, 8) of float32 = 17179869184 bytes, "
                        "over the 2 GiB limit for one calibration array")),
    "over_limit_npz": ({"a.npz": _zip_of(Entry.of("input.npy", _header_only((2**26, 1, 8, 8))))},
                       "a.npz: input 'input' declares shape (67108864, 1, 8, 8)"),
    "absurd_shape": ({"a.npy": _header_only((2**40, 2**40, 8, 8))}, "over the 2 GiB limit for one calibration array"),
    "zip_size_lies_low": ({"a.npz": _zip_of(Entry.of("input.npy", _SAMPLE_NPY, declared_size=len(_SAMPLE_NPY) - 100))},
                          ("cannot read calibration file a.npz: corrupt .npz file (entry 'input.npy' declares 256 "
                           "bytes of data, its zip entry holds 156)")),
    "zip_size_lies_high": ({"a.npz": _zip_of(Entry.of("input.npy", _SAMPLE_NPY, declared_size=len(_SAMPLE_NPY) + 2**30))},
                           "declares 256 bytes of data, its zip entry holds 1073742080"),
    "trailing_data_in_entry": ({"a.npz": _zip_of(Entry.of("input.npy", _SAMPLE_NPY + bytes(64)))},
                               "corrupt .npz file (entry 'input.npy' declares 256 bytes of data, its zip entry holds 320)"),
    "duplicate_entries": ({"a.npz": _duplicate_entries}, "corrupt .npz file (entry 'input.npy' appears twice)"),
    "truncated_npy": ({"a.npy": _SAMPLE_NPY[:-100]},
                      "cannot read calibration file a.npy: truncated (its header declares 256 bytes of data, the file holds 156)"),
    "object_npy": ({"a.npy": npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True)},
                   "cannot read calibration file a.npy: not a .npy file of plain arrays (save them with np.save / np.savez)"),
    "object_npz": ({"a.npz": _zip_of(Entry.of("input.npy", npy_bytes(np.array([1, "x"], dtype=object), allow_pickle=True)))},
                   "cannot read calibration file a.npz: entry 'input.npy' is not a .npy file of plain arrays"),
    "pickle_named_npy": ({"a.npy": pickle.dumps(SAMPLE)}, "cannot read calibration file a.npy: not a .npy file of plain arrays"),
    "pickle_named_npz": ({"a.npz": pickle.dumps({"input": SAMPLE})}, "cannot read calibration file a.npz: not a .npz file of plain arrays"),
    "npy_named_npz": ({"a.npz": _SAMPLE_NPY}, "cannot read calibration file a.npz: not a .npz file of plain arrays"),
    "garbage_npy": ({"a.npy": b"garbage"}, "cannot read calibration file a.npy: not a .npy file"),
    "entry_not_npy": ({"a.npz": _zip_of(Entry.of("input.npy", b"hello"))}, "entry 'input.npy' is not a .npy file of plain arrays"),
    "huge_header": ({"a.npy": _HUGE_HEADER}, "cannot read calibration file a.npy: not a .npy file of plain arrays"),
    "negative_dim": ({"a.npy": npy_header((-1, 1, 8, 8), np.float32)}, "not a .npy file of plain arrays"),
    "wrong_dtype": ({"a.npy": SAMPLE.astype(np.float64)}, "given float64[1,1,8,8] (wrong dtype)"),
    "wrong_dtype_big_endian": ({"a.npy": SAMPLE.astype(">f8")},
                               "input 'input' expects float32[?,1,8,8], given float64[1,1,8,8] (wrong dtype)"),
    "wrong_rank": ({"a.npy": SAMPLE[0]}, "input 'input' expects float32[?,1,8,8], given float32[1,8,8] (wrong rank)"),
    "wrong_shape": ({"a.npy": np.zeros((1, 1, 9, 8), np.float32)},
                    "input 'input' expects float32[?,1,8,8], given float32[1,1,9,8] (wrong shape)"),
    "empty_array": ({"a.npy": np.zeros((0, 1, 8, 8), np.float32)}, "input 'input' is empty"),
    "npz_unknown_input": ({"a.npz": {"input": SAMPLE, "other": SAMPLE}}, "a.npz: unknown input(s) other"),
    "npz_missing_input": ({"a.npz": {"other": SAMPLE}},
                          "a.npz: missing input(s) input; unknown input(s) other (model inputs: input)"),
    "npz_no_entries": ({"a.npz": _zip_of()}, "a.npz: missing input(s) input"),
    "npz_unknown_garbage_entry": ({"a.npz": _zip_of(Entry.of("input.npy", _SAMPLE_NPY), Entry.of("notes.txt", b"hi"))},
                                  "a.npz: unknown input(s) notes.txt"),
    "bad_after_good": ({"a.npy": SAMPLE, "b.npy": _header_only((2**26, 1, 8, 8))}, "b.npy: input 'input' declares shape"),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_hostile_calibration_file_api(tmp_path, case):
    files, text = DATA_CASES[case]
    folder = folder_with(tmp_path, files)
    with pytest.raises(CalibrationDataError) as info:
        list(iter_folder(folder, SPECS))
    assert_one_line(str(info.value), text)
    assert info.value.exit_code == DATA


@pytest.mark.parametrize("case", ["over_limit_npz", "zip_size_lies_low", "object_npz", "pickle_named_npy", "huge_header",
                                  "wrong_dtype_big_endian", "bad_after_good"])
def test_hostile_calibration_file_through_quantize_model(tmp_path, case):
    files, text = DATA_CASES[case]
    with pytest.raises(CalibrationDataError) as info:
        quantize_model(SAMPLE_MODEL, folder_with(tmp_path, files), show_progress=False)
    assert_one_line(str(info.value), text)
    assert info.value.exit_code == DATA


@pytest.mark.parametrize("case", ["over_limit_npy", "trailing_data_in_entry", "object_npy", "pickle_named_npz",
                                  "huge_header", "wrong_dtype"])
def test_hostile_calibration_file_cli(tmp_path, out_dir, case):
    files, text = DATA_CASES[case]
    result = invoke(SAMPLE_MODEL, "--data", folder_with(tmp_path, files), "-o", out_dir / "q.onnx",
                    "--save-ranges", out_dir / "r.json")
    assert_clean_cli_failure(result, DATA, text, out_dir)


_DTYPES = ["<f4", ">f4", "<f8", ">f8", "<f2", "|u1", "<i8", "|b1", "<U3", "|S2", "<c8"]


@HOSTILE
@given(dtype=st.sampled_from(_DTYPES),
       shape=st.lists(st.one_of(st.integers(0, 9), st.sampled_from([2**20, 2**31, 2**62])), max_size=5).map(tuple),
       body=st.sampled_from(["whole", "short", "none"]), as_npz=st.booleans())
def test_any_declared_array_is_loaded_only_if_it_fits(tmp_path, dtype, shape, body, as_npz):
    """Whatever a header declares: accepted (and read right) only when it fits the input
    and its data is all there; otherwise one line, nothing allocated for the declaration."""
    folder = tmp_path / "calib"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    header = npy_header(shape, dtype)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, min(nbytes, 1 << 20), dtype=np.uint8).tobytes()
    if body == "short":
        data = data[: len(data) // 2]
    elif body == "none":
        data = b""
    raw = header + data
    if as_npz:
        write_zip(folder / "s.npz", [Entry.of("input.npy", raw)])
    else:
        (folder / "s.npy").write_bytes(raw)
    fits = (np.dtype(dtype).newbyteorder("=") == np.float32 and len(shape) == 4 and shape[1:] == (1, 8, 8)
            and shape[0] > 0 and nbytes <= dataset.MAX_SAMPLE_BYTES and len(data) == nbytes)
    if fits:
        (sample,) = iter_folder(folder, SPECS)
        expected = np.frombuffer(data, dtype).reshape(shape)
        assert sample["input"].dtype == np.float32 and sample["input"].dtype.isnative
        np.testing.assert_array_equal(sample["input"], expected)
        return
    with pytest.raises(CalibrationDataError) as info:
        list(iter_folder(folder, SPECS))
    assert_one_line(str(info.value), "s.np")
    if nbytes > dataset.MAX_SAMPLE_BYTES:
        assert "limit" in str(info.value) or "(wrong" in str(info.value), str(info.value)


# -- calibration data: harmless variants are accepted ----------------------------------

def test_big_endian_float32_is_accepted_as_native(tmp_path):
    files = CALIB_FILES[:8]
    native, swapped = tmp_path / "native", tmp_path / "swapped"
    native.mkdir()
    swapped.mkdir()
    for f in files:
        array = np.load(f)
        np.save(native / f.name, array)
        np.save(swapped / f.name, array.astype(">f4"))
    assert np.load(swapped / files[0].name).dtype.str == ">f4"
    a = quantize_model(SAMPLE_MODEL, native, show_progress=False)
    b = quantize_model(SAMPLE_MODEL, swapped, show_progress=False)
    assert a.ranges == b.ranges
    assert a.model.SerializeToString() == b.model.SerializeToString()


def test_fortran_order_is_read_right(tmp_path):
    array = np.asfortranarray(np.arange(128, dtype=np.float32).reshape(2, 1, 8, 8))
    folder = folder_with(tmp_path, {"f.npy": array})
    (sample,) = iter_folder(folder, SPECS)
    np.testing.assert_array_equal(sample["input"], array)


def string_input_model() -> onnx.ModelProto:
    """s: string[N] -> LabelEncoder -> (x: float32[N, 4]) * code -> MatMul."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml", name="enc", keys_strings=["a", "b", "c"],
                         values_floats=[0.0, 1.0, 2.0], default_float=-1.0),
        helper.make_node("Unsqueeze", ["code", "axes"], ["code2"], name="unsqueeze"),
        helper.make_node("Mul", ["code2", "x"], ["m"], name="mul"),
        helper.make_node("MatMul", ["m", "w"], ["y"], name="matmul"),
    ]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("s", TensorProto.STRING, ["N"]),
                                                 helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_numpy_strings_are_accepted_for_string_inputs(tmp_path):
    model = string_input_model()
    rng = np.random.default_rng(1)
    words = [["a"], ["b", "c"], ["c", "a", "zz"], ["b", "b", "a", "q"]]
    xs = [rng.normal(size=(len(w), 4)).astype(np.float32) for w in words]
    unicode, as_bytes = tmp_path / "unicode", tmp_path / "bytes"
    unicode.mkdir()
    as_bytes.mkdir()
    for i, (w, x) in enumerate(zip(words, xs)):
        np.savez(unicode / f"{i}.npz", s=np.array(w), x=x)  # dtype <U..
        np.savez(as_bytes / f"{i}.npz", s=np.array([v.encode() for v in w]), x=x)  # dtype |S..
    assert np.load(unicode / "0.npz")["s"].dtype.kind == "U" and np.load(as_bytes / "0.npz")["s"].dtype.kind == "S"
    reference = quantize_model(model, [{"s": np.array(w, dtype=object), "x": x} for w, x in zip(words, xs)],
                               show_progress=False)
    for folder in (unicode, as_bytes):
        result = quantize_model(model, folder, show_progress=False)
        assert result.ranges == reference.ranges
    assert reference.ranges["code"] == (-1.0, 2.0)  # 'zz' and 'q' are unknown: the default -1


def test_non_utf8_bytes_for_a_string_input(tmp_path):
    specs = [InputSpec("s", np.dtype(object), ("N",))]
    folder = folder_with(tmp_path, {"a.npy": np.array([b"\xff\xfe"])})
    with pytest.raises(CalibrationDataError) as info:
        list(iter_folder(folder, specs))
    assert_one_line(str(info.value), "a.npy: input 's' holds bytes that are not UTF-8")


# -- calibration states ----------------------------------------------------------------

@pytest.fixture(scope="module")
def stage1():
    return optimize_model(SAMPLE_MODEL)


@pytest.fixture(scope="module")
def state_arrays(stage1, tmp_path_factory):
    """The entries of a real state file (16 samples, histograms kept)."""
    calibrator = Calibrator(stage1, keep_histograms=True)
    calibrator.collect_data([np.load(f) for f in CALIB_FILES[:16]])
    path = tmp_path_factory.mktemp("state") / "state.npz"
    calibrator.save_state(path)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert load_state(path).statistics == calibrator.statistics
    return arrays


def meta_of(arrays) -> dict:
    return json.loads(arrays["meta"].tobytes())


def with_meta(arrays, meta) -> dict:
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return {**arrays, "meta": np.frombuffer(raw, np.uint8)}


def with_ints(arrays, i=0, **fields) -> dict:
    names = ["count", "nonfinite", "level", "offset", "bins", "with_histogram"]
    ints = arrays[f"t{i}_ints"].copy()
    for field, value in fields.items():
        ints[names.index(field)] = value
    return {**arrays, f"t{i}_ints": ints}


def changed(arrays, **entries) -> dict:
    out = {**arrays, **entries}
    return {k: v for k, v in out.items() if v is not None}


def _meta_change(**fields):
    def change(arrays):
        meta = meta_of(arrays)
        for key, value in fields.items():
            if value is KeyError:
                del meta[key]
            else:
                meta[key] = value
        return with_meta(arrays, meta)
    return change


def _level(delta):
    return lambda a: with_ints(a, level=int(a["t0_ints"][2]) + delta)


def _offset(delta):
    return lambda a: with_ints(a, offset=int(a["t0_ints"][3]) + delta)


STATE_CASES = {
    # case: (change of the entries, text); the file is always named state.npz
    "meta_not_json": (lambda a: with_meta(a, b"\xff{not json"), "is not a calibration state file (its 'meta' entry is not JSON)"),
    "meta_a_list": (lambda a: with_meta(a, [1, 2]), "(its 'meta' entry is not a JSON object)"),
    "meta_float_array": (lambda a: changed(a, meta=np.zeros(3)), "(entry 'meta' is float64[3], expected bytes of one dimension)"),
    "no_meta": (lambda a: changed(a, meta=None), "is not a calibration state file (no 'meta' entry)"),
    "no_format": (_meta_change(format=KeyError), "(its 'meta' entry has no 'format')"),
    "format_2": (_meta_change(format=2), "state.npz: unsupported calibration state format 2"),
    "format_long": (_meta_change(format="x" * 500), "unsupported calibration state format 'xxxxxxxx"),
    "no_tensors": (_meta_change(tensors=KeyError), "(its 'meta' entry has no 'tensors')"),
    "no_fingerprint": (_meta_change(fingerprint=KeyError), "(its 'meta' entry has no 'fingerprint')"),
    "fingerprint_int": (_meta_change(fingerprint=12), "(its model fingerprint is not a sha256 hex digest)"),
    "fingerprint_list": (_meta_change(fingerprint=["ab"]), "(its model fingerprint is not a sha256 hex digest)"),
    "fingerprint_newline": (_meta_change(fingerprint="ab\ncd"), "(its model fingerprint is not a sha256 hex digest)"),
    "samples_negative": (_meta_change(samples=-1), "(its sample count is not a non-negative integer)"),
    "samples_fraction": (_meta_change(samples=2.5), "(its sample count is not a non-negative integer)"),
    "samples_bool": (_meta_change(samples=True), "(its sample count is not a non-negative integer)"),
    "samples_huge": (_meta_change(samples=2**70), "(its sample count is not a non-negative integer)"),
    "samples_zero_with_values": (_meta_change(samples=0), "(it holds values but a sample count of 0)"),
    "tensors_not_list": (_meta_change(tensors="input"), "(its tensor list is not a list of names)"),
    "tensor_twice": (lambda a: _meta_change(tensors=meta_of(a)["tensors"][:1] * 2)(a), "(its tensor list names a tensor twice)"),
    "missing_counts": (lambda a: changed(a, t0_counts=None), "(no 't0_counts' entry)"),
    "huge_level": (lambda a: with_ints(a, level=10**15), "has histogram level 1000000000000000, expected -1074..1023"),
    "level_off_by_one": (_level(1), "implies"),
    "level_finer": (_level(-3), "implies"),
    "offset_below_range": (_offset(-5), "has histogram bins outside its range"),
    "offset_above_range": (_offset(5), "has histogram bins outside its range"),
    "offset_int64_min": (lambda a: with_ints(a, offset=-2**63), "has histogram bins outside its range"),
    "negative_count": (lambda a: with_ints(a, count=-1), "has a negative value count (-1 finite"),
    "negative_nonfinite": (lambda a: with_ints(a, nonfinite=-5), "has a negative value count"),
    "count_below_histogram": (lambda a: with_ints(a, count=1), "values in its histogram for 1 values seen"),
    "zero_bins": (lambda a: with_ints(a, bins=0), "has 0 histogram bins, expected 1..65536"),
    "bins_below_counts": (lambda a: with_ints(a, bins=1), "histogram counts for 1 bins"),
    "histogram_flag_2": (lambda a: with_ints(a, with_histogram=2), "has a histogram flag of 2, expected 0 or 1"),
    "flag_without_counts": (lambda a: with_ints(a, with_histogram=0), "histogram counts with the histogram flag 0"),
    "ints_float": (lambda a: changed(a, t0_ints=a["t0_ints"].astype(np.float64)), "entry 't0_ints' is float64[6], expected integers of shape (6,)"),
    "ints_wrong_length": (lambda a: changed(a, t0_ints=a["t0_ints"][:5]), "entry 't0_ints' is int64[5], expected integers of shape (6,)"),
    "ints_uint64_huge": (lambda a: changed(a, t0_ints=a["t0_ints"].astype(np.uint64) | np.uint64(2**63)), "integer field outside int64"),
    "counts_too_long": (lambda a: changed(a, t0_counts=np.ones(2049, np.int64)), "has 2049 histogram counts for 2048 bins"),
    "counts_negative": (lambda a: changed(a, t0_counts=-a["t0_counts"]), "has histogram counts outside 0..2**63-1"),
    "counts_2d": (lambda a: changed(a, t0_counts=a["t0_counts"].reshape(1, -1)), "expected integers of one dimension"),
    "counts_float": (lambda a: changed(a, t0_counts=a["t0_counts"].astype(np.float32)), "is float32["),
    "nan_min": (lambda a: changed(a, t0_range=np.array([np.nan, 1.0])), "has a NaN min/max"),
    "nan_max": (lambda a: changed(a, t0_range=np.array([0.0, np.nan])), "has a NaN min/max"),
    "inf_max": (lambda a: changed(a, t0_range=np.array([0.0, np.inf])), "has an invalid range [0.0, inf]"),
    "min_above_max": (lambda a: changed(a, t0_range=np.array([2.0, 1.0])), "has an invalid range [2.0, 1.0]"),
    "span_overflows": (lambda a: changed(a, t0_range=np.array([-1.7e308, 1.7e308])), "has an invalid range"),
    "empty_but_range": (lambda a: changed(with_ints(a, count=0), t0_counts=np.zeros(0, np.int64)),
                        "has no values but a range"),
    "range_wrong_shape": (lambda a: changed(a, t0_range=np.zeros(3)), "entry 't0_range' is float64[3], expected floats of shape (2,)"),
    "object_entry": (lambda a: changed(a, t0_counts=np.array([{}], dtype=object)),
                     "state.npz is not a calibration state file (entry 't0_counts.npy' is not a plain array)"),
}


def write_state(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)  # allow_pickle is np.save's default: object entries end up pickled
    return path


@pytest.mark.parametrize("case", STATE_CASES)
def test_tampered_state_api(tmp_path, state_arrays, case):
    change, text = STATE_CASES[case]
    path = write_state(tmp_path / "state.npz", change(state_arrays))
    with pytest.raises(CalibrationDataError) as info:
        load_state(path)
    assert_one_line(str(info.value), text)
    assert str(info.value).startswith("state.npz")
    assert info.value.exit_code == DATA


def _pickled(path):
    path.write_bytes(pickle.dumps({"meta": [1, 2, 3]}))


def _counts_bomb(arrays):
    """A state whose t0_counts entry really inflates to 1 GiB of zeros."""
    def write(path):
        entries = [Entry.of(f"{k}.npy", npy_bytes(v)) for k, v in arrays.items() if k != "t0_counts"]
        write_zip(path, entries + [zeros_entry("t0_counts.npy", (2**27,), np.int64)])
    return write


NOT_STATE_FILES = {
    "pickle": (_pickled, "state.npz is not a calibration state file (not an .npz of plain arrays written by `save_calibration`)"),
    "calibration_sample": (lambda p: np.savez(p, input=SAMPLE), "state.npz is not a calibration state file (no 'meta' entry)"),
    "object_meta": (lambda p: np.savez(p, meta=np.array([{"format": 1}], dtype=object)),
                    "state.npz is not a calibration state file (entry 'meta.npy' is not a plain array)"),
    "empty": (lambda p: p.write_bytes(b""), "state.npz is not a calibration state file (not an .npz of plain arrays"),
    "npy": (lambda p: p.write_bytes(npy_bytes(SAMPLE)), "state.npz is not a calibration state file (not an .npz"),
    "onnx_model": (lambda p: p.write_bytes(SAMPLE_MODEL.read_bytes()), "state.npz is not a calibration state file (not an .npz"),
    "corrupt_entry": (lambda p: write_zip(p, [Entry.of("meta.npy", npy_bytes(np.zeros(4, np.uint8)), declared_size=10**6)]),
                      "state.npz is not a calibration state file (corrupt .npz file (entry 'meta.npy' declares 4 bytes"),
}


@pytest.mark.parametrize("case", NOT_STATE_FILES)
def test_not_a_state_file(tmp_path, case):
    write, text = NOT_STATE_FILES[case]
    path = tmp_path / "state.npz"
    write(path)
    with pytest.raises(CalibrationDataError) as info:
        load_state(path)
    assert_one_line(str(info.value), text)
    assert "pickle" not in str(info.value)


def test_state_with_an_inflating_entry_is_refused_unread(tmp_path, state_arrays):
    path = tmp_path / "state.npz"
    _counts_bomb(state_arrays)(path)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CalibrationDataError) as info:
            load_state(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line(str(info.value), "(entry 't0_counts' declares 1073741824 bytes, over the 524288 allowed)")
    assert peak < 50 << 20, peak


_INT_FIELDS = ["count", "nonfinite", "level", "offset", "bins", "with_histogram"]
_any_int64 = st.one_of(st.integers(-3, 3), st.integers(-2**63, 2**63 - 1), st.integers(-1100, 1100))
_any_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                         max_leaves=5)


@st.composite
def tamperings(draw, arrays):
    """A few random edits of a real state's entries: integer fields (by a little or to
    anything), the range, the counts, or a meta field."""
    out = dict(arrays)
    tensors = meta_of(arrays)["tensors"]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(tensors) - 1))
        kind = draw(st.sampled_from(["int_delta", "int_any", "range", "counts_edit", "counts_new", "meta"]))
        if kind in ("int_delta", "int_any"):
            field = draw(st.sampled_from(_INT_FIELDS))
            ints = out[f"t{i}_ints"].copy()
            k = _INT_FIELDS.index(field)
            value = int(ints[k]) + draw(st.integers(-3, 3)) if kind == "int_delta" else draw(_any_int64)
            ints[k] = max(min(value, 2**63 - 1), -2**63)
            out[f"t{i}_ints"] = ints
        elif kind == "range":
            finite_or_not = st.floats(allow_nan=True, allow_infinity=True)
            low, high = out[f"t{i}_range"]
            out[f"t{i}_range"] = np.array([draw(st.sampled_from([low, high]) | finite_or_not),
                                           draw(st.sampled_from([low, high]) | finite_or_not)])
        elif kind == "counts_edit":
            counts = out[f"t{i}_counts"].copy()
            if counts.size:
                j = draw(st.integers(0, counts.size - 1))
                counts[j] = draw(_any_int64)
            out[f"t{i}_counts"] = counts[draw(st.integers(0, 3)):] if draw(st.booleans()) else counts
        elif kind == "counts_new":
            out[f"t{i}_counts"] = np.array(draw(st.lists(st.integers(-2, 2**40), max_size=40)), np.int64)
        else:
            meta = meta_of(out)
            meta[draw(st.sampled_from(["format", "fingerprint", "samples", "tensors"]))] = draw(_any_json)
            out = with_meta(out, meta)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_randomly_tampered_state_is_refused_or_works(tmp_path, stage1, state_arrays, data):
    """A tampered state is either refused with one line (CalibrationDataError), or it is
    one that calibration could have produced: merging it and computing every method's
    ranges from it raises nothing but our one-line errors."""
    path = write_state(tmp_path / "state.npz", data.draw(tamperings(state_arrays)))
    try:
        state = load_state(path)
    except CalibrationDataError as exc:
        assert_one_line(str(exc), "state.npz")
        return
    calibrator = Calibrator(stage1, keep_histograms=True)
    try:
        calibrator.load_state(state)
        calibrator.load_state(state)  # merged with itself too
    except CalibrationDataError as exc:
        assert_one_line(str(exc), "different model")
        return
    for method in ("MIN_MAX_ASYM", "PERCENTILE_SYM", "ENTROPY_ASYM", "MSE_SYM", "SQNR_ASYM"):
        try:
            ranges = calibrator.compute_range(method)
        except QuantizerError as exc:
            assert_one_line(str(exc), "")
            continue
        assert all(math.isfinite(lo) and math.isfinite(hi) and lo <= hi for lo, hi in ranges.values()), ranges


@pytest.mark.parametrize("case", ["meta_not_json", "huge_level", "nan_min", "object_entry", "samples_negative"])
def test_tampered_state_cli(tmp_path, state_arrays, out_dir, case):
    change, text = STATE_CASES[case]
    path = write_state(tmp_path / "state.npz", change(state_arrays))
    result = invoke(SAMPLE_MODEL, "--load-calibration", path, "-o", out_dir / "q.onnx", "--save-calibration",
                    out_dir / "merged.npz")
    assert_clean_cli_failure(result, DATA, text, out_dir)


def test_pickle_state_cli(tmp_path, out_dir):
    path = tmp_path / "state.npz"
    _pickled(path)
    result = invoke(SAMPLE_MODEL, "--load-calibration", path, "-o", out_dir / "q.onnx")
    assert_clean_cli_failure(result, DATA, "state.npz is not a calibration state file (not an .npz of plain arrays "
                                           "written by --save-calibration)", out_dir)


# -- ranges ----------------------------------------------------------------------------

RANGES_CASES = {
    "infinity": ('{"input": [0, Infinity]}', "r.json: range of 'input' must be finite numbers, got [0, inf]"),
    "minus_infinity": ('{"input": [-Infinity, 1]}', "range of 'input' must be finite numbers, got [-inf, 1]"),
    "nan": ('{"a": [0, 1], "input": [NaN, 1]}', "range of 'input' must be finite numbers, got [nan, 1]"),
    "overflowing_float": ('{"input": [0, 1e400]}', "range of 'input' must be finite numbers, got [0, inf]"),
    "overflowing_int": ('{"input": [0, 1' + "0" * 400 + "]}", "range of 'input' must be finite numbers, got [0, 1000"),
    "bool": ('{"input": [true, 1]}', "range of 'input' must be [min, max], got [True, 1]"),
    "min_above_max": ('{"input": [2, 1]}', "range of 'input' has min > max: [2, 1]"),
    "deep": ("[" * 100000 + "]" * 100000, "r.json is not valid JSON"),
    "not_json": ("{input: 1}", "r.json is not valid JSON: Expecting property name"),
}


@pytest.mark.parametrize("case", RANGES_CASES)
def test_bad_ranges_file(tmp_path, case):
    text, message = RANGES_CASES[case]
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_ranges(path)
    assert_one_line(str(info.value), message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=st.dictionaries(st.text(max_size=8), st.tuples(st.floats(-1e30, 1e30), st.floats(0, 1e30)), max_size=4),
       name=st.text(max_size=8), bad=st.sampled_from([math.inf, -math.inf, math.nan]), position=st.integers(0, 1),
       other=st.floats(-1e30, 1e30))
def test_a_non_finite_range_is_refused_naming_its_tensor(tmp_path, good, name, bad, position, other):
    data = {n: [lo, lo + width] for n, (lo, width) in good.items() if n != name}
    pair = [other, other]
    pair[position] = bad
    data[name] = pair
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))  # json writes Infinity / NaN, and reads them back
    with pytest.raises(UsageError) as info:
        load_ranges(path)
    assert_one_line(str(info.value), f"range of {name!r} must be finite numbers")
    del data[name]
    path.write_text(json.dumps(data))
    assert load_ranges(path) == {n: tuple(map(float, p)) for n, p in data.items()}


def test_bad_ranges_cli(tmp_path, out_dir):
    path = tmp_path / "r.json"
    path.write_text('{"input": [0, Infinity]}')
    result = invoke(SAMPLE_MODEL, "--ranges", path, "-o", out_dir / "q.onnx")
    assert_clean_cli_failure(result, USAGE, "r.json: range of 'input' must be finite numbers, got [0, inf]", out_dir)


def test_big_endian_arrays_in_memory_calibrate_like_native_ones():
    from quantizer import quantize_model

    native = [np.load(SAMPLE_CALIB / f"sample_{i:03d}.npy") for i in range(4)]
    swapped = [a.astype(">f4") for a in native]
    a = quantize_model(SAMPLE_MODEL, native, show_progress=False)
    b = quantize_model(SAMPLE_MODEL, swapped, show_progress=False)
    assert a.ranges == b.ranges
    assert a.model.SerializeToString(deterministic=True) == b.model.SerializeToString(deterministic=True)
