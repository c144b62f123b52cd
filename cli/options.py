"""Options shared by several commands, defined once, and the parsers of their values.

This module and ``text.py`` are the only places that know flag names: ``FLAGS`` maps the
library's parameter names (backquoted in its messages) to the flags that set them.
"""

from __future__ import annotations

import math

import click
from quantizer.calibrators import CalibrationMethod

from quantizer.config import AUTO, DEFAULT_FIDELITY_SAMPLES, DEFAULT_MIN_SQNR_DB, DEFAULT_PERCENTILE, PRESETS
from quantizer.dataset import DataOptions, DataSpec, ImagePreprocessing
from quantizer.errors import UsageError
from quantizer.report import DEFAULT_REPORT_SAMPLES

FLAGS = {
    "method": "--calib", "methods": "--calib", "percentile": "--percentile", "input_shapes": "--input-shape",
    "target": "--target", "activation_dtype": "--activation-dtype", "weight_range": "--weight-range", "exclude": "--exclude",
    "protect=False": "--no-protect", "protect_normalization": "--no-protect-normalization",
    "bias_correction": "--bias-correction", "equalize": "--equalize", "smooth_quant": "--smooth-quant", "smooth_alpha": "--smooth-alpha",
    "smooth_insert": "--smooth-insert", "adaround": "--adaround", "adaround_iterations": "--adaround-iterations", "preset": "--preset",
    "accuracy_samples": "--accuracy-samples", "report_samples": "--report-samples", "range_overrides": "--input-range",
    "min_sqnr_db": "--min-sqnr", "strict": "--strict", "fidelity_samples": "--fidelity-samples", "model": "-o", "report": "--report", "save_ranges": "--save-ranges",
    "save_calibration": "--save-calibration", "max_trials": "--max-trials", "tolerable_loss": "--tolerable-loss",
    "ranges": "--ranges", "load_calibration": "--load-calibration", "integer_outputs": "--output-type",
    "input_types": "--input-type", "output_types": "--output-type",
    "max_samples": "--max-samples", "shard": "--shard", "workers": "--workers", "scheduler": "--scheduler", "shuffle_seed": "--shuffle-seed", "preprocess": "--preprocess",
    "images": "--preprocess/--image-*", "images.size": "--image-size", "images.layout": "--image-layout",
    "images.channel_order": "--channel-order", "images.scale": "--image-scale", "images.mean": "--mean",
    "images.std": "--std",
    "mode": "--mode", "weight_bits": "--weight-bits", "block_size": "--block-size",
    "weight_symmetric": "--weight-symmetric", "weight_signed": "--weight-unsigned",
    "weight_algorithm": "--weight-algorithm", "dataset": "--data", "embeddings": "--no-embeddings",
    "wide_tensors": "--wide-tensor", "algorithms": "--tune-algorithms",
}


def option_group(*options):
    """A decorator applying ``options`` in the order listed (first = first in --help)."""
    def apply(func):
        for option in reversed(options):
            func = option(func)
        return func
    return apply


METHOD_NAMES = [AUTO, *(m.value.lower() for m in CalibrationMethod)]
METHODS = ", ".join(METHOD_NAMES)


def complete_method(ctx, param, incomplete: str):
    """Shell completion of --calib: the method names that start with what was typed."""
    return [m for m in METHOD_NAMES if m.startswith(incomplete.lower())]


def complete_target(ctx, param, incomplete: str):
    from quantizer.targets import preset_names

    return [name for name in preset_names() if name.startswith(incomplete)]

input_shape = click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=D1,D2,...",
                           help="Fix a dynamic input shape, e.g. x=1,3,224,224 (repeatable; NAME:D1,... also works).")
debug = click.option("--debug", is_flag=True, help="Show tracebacks (with the original cause) and library logs.")
quiet = click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary (warnings still go to stderr).")
output = click.option("-o", "--output", type=click.Path(), help="Output model [default: MODEL_int8.onnx beside MODEL].")
data = click.option("--data", "data", type=click.Path(),
                    help="Calibration data: a folder of .npy (single input) or .npz (keyed by input name) "
                         "samples; one stacked .npy/.npz file holding the samples along axis 0 (B rows per "
                         "sample for a fixed batch B, else 1); or a folder of images (.png, .jpg, .jpeg, .bmp, "
                         ".tif, .webp; see --preprocess, needs Pillow).")
percentile = click.option("--percentile", "percentage", default=DEFAULT_PERCENTILE, show_default=True, type=float,
                          help="Percentile for the PERCENTILE methods.")
target = click.option("--target", default="ort-cpu", show_default=True, metavar="NAME|FILE",
                      shell_complete=complete_target,
                      help="Backend to quantize for: ort-cpu (resolved for this machine), ort-cpu-x86, "
                           "ort-cpu-vnni, ort-cpu-arm, tensorrt, tensorrt-fp8, tflite (npu), or a .toml/.json target file "
                           "(see `quantize targets`).")
activation_dtype = click.option("--activation-dtype", type=click.Choice(["int8", "uint8"]), default=None,
                                help="Activation type [default: the target's; checked against what it allows].")
weight_range = click.option("--weight-range", type=click.Choice(["auto", "full", "reduced"]), default=None,
                            help="full: [-127,127]; reduced: [-63,63], exact on x86 without VNNI "
                                 "[default: the target's].")
exclude = click.option("--exclude", multiple=True, metavar="NAME|OPTYPE|GLOB",
                       help="Keep float the nodes whose name or op type matches (fnmatch glob; repeatable).")
no_protect = click.option("--no-protect", is_flag=True,
                          help="Do not keep float the nodes whose int8 scale would crush a tensor.")
no_protect_normalization = click.option(
    "--no-protect-normalization", is_flag=True,
    help="Quantize normalization arithmetic written out as ops (mean, variance, 1/sqrt) like any other op "
         "[default: kept float on every target].")
bias_correction = click.option("--bias-correction/--no-bias-correction", default=None,
                               help="Fold the mean output shift that weight rounding causes into each Conv/Gemm "
                                    "bias, kept if the outputs get closer to float [default: on].")
equalize = click.option("--equalize/--no-equalize", default=None,
                        help="Cross-layer equalization of Conv/Gemm/MatMul pairs joined by Relu-like activations "
                             "(exact in float), with high-bias absorption, before calibration [default: off].")
smooth_quant = click.option("--smooth-quant/--no-smooth-quant", default=None,
                            help="Divide MatMul/Gemm inputs with outlier channels by per-channel factors folded "
                                 "into the op before them, the weight rows multiplied, where the layer's "
                                 "quantized error drops [default: off].")
smooth_alpha = click.option("--smooth-alpha", type=click.FloatRange(0.0, 1.0), default=None, metavar="A",
                            help="SmoothQuant's migration strength for every layer (implies --smooth-quant) "
                                 "[default: searched per layer].")
smooth_insert = click.option("--smooth-insert", is_flag=True, default=None,
                             help="SmoothQuant also where no fold exists, with a float Mul before the MatMul "
                                  "[default: off].")
adaround = click.option("--adaround/--no-adaround", default=None,
                        help="Round each Conv/Gemm/MatMul weight up or down by the layer's output error on the "
                             "accuracy samples (AdaRound), kept if the outputs get no further from float "
                             "[default: off; on with --preset accurate].")
adaround_iterations = click.option("--adaround-iterations", type=click.IntRange(min=1), default=None, metavar="N",
                                   help="Optimizer steps per layer of --adaround [default: 500].")
preset = click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                      help="A bundle of accuracy settings: accurate = --adaround (slower) [default: default]; "
                           "flags given beside it win.")
accuracy_samples = click.option("--accuracy-samples", type=click.IntRange(min=1), default=None, metavar="N",
                                help="Calibration samples --calib auto, --bias-correction and --smooth-quant measure on "
                                     "[default: 8].")
report = click.option("--report", type=click.Path(),
                      help="Write the summary with per-tensor SQNR: JSON, or with a .html name one self-contained "
                           "page with charts (per-tensor SQNR in graph order, every histogram with the ranges).")
report_samples = click.option("--report-samples", default=DEFAULT_REPORT_SAMPLES, show_default=True,
                              type=click.IntRange(min=0), help="Calibration samples for the per-tensor SQNR.")
min_sqnr = click.option("--min-sqnr", default=DEFAULT_MIN_SQNR_DB, show_default=True, type=float, metavar="DB",
                        help="Warn (not fail) when an output of the written model has a lower SQNR (dB) vs the "
                             "float model on the first calibration sample.")
input_type = click.option("--input-type", "input_types", multiple=True, metavar="NAME=TYPE",
                          help="Make input NAME uint8/int8: the caller feeds the quantized tensor "
                               "(its QuantizeLinear removed) (repeatable).")
output_type = click.option("--output-type", "output_types", multiple=True, metavar="NAME=TYPE[:MIN,MAX]",
                           help="Make output NAME uint8/int8 (its DequantizeLinear removed); with MIN,MAX "
                                "requantize it to that range first (repeatable).")

strict = click.option("--strict", is_flag=True,
                      help="Fail (exit 5, nothing written) on what is otherwise a warning: an output below "
                           "--min-sqnr, an --exclude pattern matching nothing, a tensor protection cannot save, "
                           "a percentile below 1. For CI.")
fidelity_samples = click.option("--fidelity-samples", default=DEFAULT_FIDELITY_SAMPLES, show_default=True,
                                type=click.IntRange(min=1), metavar="N",
                                help="Calibration samples the written model is checked on against the float model.")

# How much of --data, in what order, and how images become arrays (quantizer.dataset.DataOptions).
max_samples = click.option("--max-samples", type=click.IntRange(min=1), default=None, metavar="N",
                           help="Calibrate on at most N samples (after --shuffle-seed) [default: all].")
shuffle_seed = click.option("--shuffle-seed", type=click.IntRange(min=0), default=None, metavar="SEED",
                            help="Shuffle the files (or the samples of a stacked file) with this seed before "
                                 "taking --max-samples [default: sorted file order, row order].")
preprocess = click.option("--preprocess", type=click.Path(), metavar="FILE",
                          help="Image preprocessing: a .toml/.json file with the keys size, layout, "
                               "channel_order, scale, mean, std (the options below change it).")
image_size = click.option("--image-size", metavar="H,W",
                          help="Resize the images to H,W [default: the model's fixed height and width].")
image_layout = click.option("--image-layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                            default=None, metavar="NCHW|NHWC",
                            help="Image tensor layout [default: NCHW when the input's dim 1 is 1 or 3, NHWC "
                                 "when its dim 3 is].")
channel_order = click.option("--channel-order", type=click.Choice(["RGB", "BGR"], case_sensitive=False),
                             default=None, metavar="RGB|BGR",
                             help="Channel order of the image tensors [default: RGB; grayscale for 1-channel "
                                  "inputs].")
image_scale = click.option("--image-scale", metavar="FLOAT",
                           help="Multiply the 0-255 pixel values by FLOAT (1/255 works) [default: 1/255].")
mean = click.option("--mean", metavar="A[,B,C]", help="Subtract per channel, after scaling [default: 0].")
std = click.option("--std", metavar="A[,B,C]", help="Then divide per channel [default: 1].")
DATA_OPTIONS = option_group(max_samples, shuffle_seed, preprocess, image_size, image_layout, channel_order,
                            image_scale, mean, std)

# Calibration on a Dask cluster (quantizer.distributed; the `distributed` extra).
workers = click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                       help="Calibrate on a local Dask cluster of N worker processes (needs the distributed extra).")
scheduler = click.option("--scheduler", metavar="ADDRESS",
                         help="Calibrate on the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786); "
                              "every worker must read --data at the same path.")
CLUSTER = option_group(workers, scheduler)


def cluster(workers: int | None, scheduler: str | None):
    """The Dask client of --workers/--scheduler (closed on exit), or None without them."""
    if workers is None and scheduler is None:
        import contextlib

        return contextlib.nullcontext(None)
    from quantizer.distributed import cluster_client

    return cluster_client(workers, scheduler)


# The kind of quantization (QuantizationConfig.mode) and the weight-only choices.
mode = click.option("--mode", type=click.Choice(["static", "dynamic", "weight-only"]), default="static",
                    show_default=True,
                    help="static: int8 Q/DQ with calibrated activation ranges; dynamic: int8 MatMul/Gemm weights, "
                         "activations quantized at run time (no --data needed; given, it only checks the result); "
                         "weight-only: int8/int4 block-quantized MatMul/Gemm weights, float activations.")
weight_bits = click.option("--weight-bits", type=click.Choice(["8", "4"]), default=None,
                           help="Weight-only: bits per weight [default: 4].")
block_size = click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=None,
                          help="Weight-only: weights per scale along the reduction axis [default: 32].")
weight_symmetric = click.option("--weight-symmetric", is_flag=True,
                                help="Weight-only: symmetric blocks (zero point at the grid's middle) instead of a "
                                     "zero point per block (min..max).")
weight_unsigned = click.option("--weight-unsigned", is_flag=True,
                               help="Weight-only: uint4/uint8 weights instead of int4/int8.")
weight_algorithm = click.option("--weight-algorithm", type=click.Choice(["rtn", "gptq"]), default=None,
                                help="Weight-only rounding: rtn (round to nearest) or gptq (error feedback over the "
                                     "--data activations) [default: rtn].")
no_embeddings = click.option("--no-embeddings", is_flag=True,
                              help="Dynamic and weight-only: keep the Gather tables (embeddings) float.")
MODE = option_group(mode, weight_bits, block_size, weight_symmetric, weight_unsigned, weight_algorithm, no_embeddings)


def mode_config(mode, weight_bits=None, block_size=None, weight_symmetric=False, weight_unsigned=False,
                weight_algorithm=None, no_embeddings=False) -> dict:
    """The QuantizationConfig fields of the MODE options (unset ones left to the config)."""
    fields = {"mode": mode, "weight_bits": int(weight_bits) if weight_bits else None,
              "block_size": int(block_size) if block_size else None, "weight_algorithm": weight_algorithm}
    if weight_symmetric:
        fields["weight_symmetric"] = True
    if weight_unsigned:
        fields["weight_signed"] = False
    if no_embeddings:
        fields["embeddings"] = False
    return {k: v for k, v in fields.items() if v is not None}


# What `run` and `tune` both take.
QUANTIZATION = option_group(data, DATA_OPTIONS, output, target, percentile, activation_dtype, weight_range, exclude,
                            no_protect, no_protect_normalization, bias_correction, equalize, smooth_quant, smooth_alpha,
                            smooth_insert, adaround, adaround_iterations, preset, accuracy_samples, report, quiet,
                            input_shape, strict, fidelity_samples, CLUSTER, debug)


def accuracy_steps(no_protect_normalization: bool, bias_correction: bool | None,
                   accuracy_samples: int | None, **flags) -> dict:
    """The accuracy-step parameters the flags set (unset flags leave the defaults);
    ``flags``: more of them by parameter name (equalize, smooth_quant, ...), None when unset."""
    chosen = {"protect_normalization": False} if no_protect_normalization else {}
    if flags.get("smooth_quant") is None and (flags.get("smooth_alpha") is not None or flags.get("smooth_insert")):
        flags = {**flags, "smooth_quant": True}  # --smooth-alpha / --smooth-insert ask for SmoothQuant
    chosen.update({name: value for name, value in flags.items() if value is not None})
    if bias_correction is not None:
        chosen["bias_correction"] = bias_correction
    if accuracy_samples is not None:
        chosen["accuracy_samples"] = accuracy_samples
    return chosen


def algorithm_flag(name: str) -> str:
    """An accuracy algorithm as --tune-algorithms spells it: smooth_quant -> smooth-quant."""
    return name.replace("_", "-")


def parse_algorithms(text: str | None, known: tuple[str, ...]) -> tuple[str, ...] | None:
    """--tune-algorithms: comma-separated names as the flags spell them (smooth-quant), or
    none; None when the flag is not given (the library's default)."""
    if text is None:
        return None
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    spelled = {algorithm_flag(name): name for name in known}
    for name in names:
        if name not in spelled:
            raise UsageError(f"--tune-algorithms: unknown algorithm {name!r}; use a comma-separated list of "
                             f"{', '.join(spelled)}, or none")
    if not names:
        raise UsageError(f"--tune-algorithms needs a comma-separated list of {', '.join(spelled)}, or none")
    return tuple(spelled[name] for name in names)


def parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    """NAME=D1,D2,... (or the older NAME:D1,D2,...) -> {name: dims}."""
    shapes = {}
    for text in values:
        sep = "=" if "=" in text else ":"
        name, found, dims = text.rpartition(sep)
        try:
            if not found or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UsageError(f"--input-shape expects NAME=D1,D2,... (e.g. x=1,3,224,224), got {text!r}") from None
    return shapes


def _split_assignment(text: str, option: str, form: str) -> tuple[str, str]:
    name, sep, value = text.rpartition("=")
    if not sep or not name or not value:
        raise UsageError(f"{option} expects {form}, got {text!r}")
    return name, value


def _parse_range(text: str, option: str, form: str, whole: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{option} expects {form}, got {whole!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise UsageError(f"{option}: range must be finite with MIN <= MAX, got {whole!r}")
    return low, high


def _tensor_type(text: str, option: str, whole: str) -> str:
    if text.lower() not in ("uint8", "int8"):
        raise UsageError(f"{option} {whole}: unsupported type {text!r}; use uint8 or int8")
    return text.lower()


def parse_input_types(values: tuple[str, ...]) -> dict[str, str]:
    types = {}
    for text in values:
        name, value = _split_assignment(text, "--input-type", "NAME=uint8|int8 (e.g. x=uint8)")
        types[name] = _tensor_type(value, "--input-type", text)
    return types


def parse_output_types(values: tuple[str, ...]) -> dict[str, tuple[str, tuple[float, float] | None]]:
    form = "NAME=uint8|int8[:MIN,MAX] (e.g. logits=int8 or logits=int8:-10,10)"
    types = {}
    for text in values:
        name, value = _split_assignment(text, "--output-type", form)
        dtype, sep, range_text = value.partition(":")
        tensor_range = _parse_range(range_text, "--output-type", form, text) if sep else None
        types[name] = (_tensor_type(dtype, "--output-type", text), tensor_range)
    return types


def parse_input_ranges(values: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    form = "NAME=MIN,MAX (e.g. x=0,1)"
    ranges = {}
    for text in values:
        name, value = _split_assignment(text, "--input-range", form)
        ranges[name] = _parse_range(value, "--input-range", form, text)
    return ranges


def data_options(max_samples=None, shuffle_seed=None, preprocess=None, image_size=None, image_layout=None,
                 channel_order=None, image_scale=None, mean=None, std=None, shard=None) -> DataOptions:
    """The DataOptions of the flags above: --preprocess first, then each image flag given
    changes its field (the library checks the values; its messages name the flags)."""
    images = None
    if preprocess or any(v is not None for v in (image_size, image_layout, channel_order, image_scale, mean, std)):
        images = ImagePreprocessing.from_file(preprocess) if preprocess else ImagePreprocessing()
        images = images.updated(size=image_size, layout=image_layout, channel_order=channel_order,
                                scale=image_scale, mean=mean, std=std)
    return DataOptions(max_samples=max_samples, shuffle_seed=shuffle_seed, images=images, shard=shard)


def data_argument(data, forms: dict):
    """``--data`` as the library takes it: the path, or a DataSpec when a data option is given."""
    found = data_options(**forms)
    if found.is_default:
        return data
    if not data:
        given = ["--" + k.replace("_", "-") for k, v in forms.items() if v is not None]
        raise UsageError(f"{', '.join(given)} need --data (they say how to read it)")
    return DataSpec(data, found)
