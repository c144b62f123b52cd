"""The one object handed through the pipeline's steps.

A step reads what earlier steps left here and adds its own result; nothing else carries
state between steps.  The stage-1 model exists once as an ``ir.Model`` (plans and
protection read it) and once as a ModelProto (onnxruntime sessions and the calibration
fingerprint read it); Q/DQ insertion works on its own copy, so autotune's trials can
fork the context after calibration and each quantize from the same statistics.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .config import CalibrationInputs, Outputs, QuantizationConfig
from .model_io import Transaction


@dataclass
class Written:
    """The model file a run wrote (renamed into place when the run's transaction commits)."""

    path: Path
    size: int
    fidelity: Any = None  # verify.Fidelity


@dataclass
class Context:
    config: QuantizationConfig
    source: Any  # the model as given: path, bytes or ModelProto
    inputs: CalibrationInputs = field(default_factory=CalibrationInputs)
    outputs: Outputs = field(default_factory=Outputs)
    keep_histograms: bool = False  # autotune computes several methods from one state
    client: Any = None  # a dask.distributed.Client: calibrate on its cluster (quantizer.distributed)

    original: onnx.ModelProto | None = None
    input_sha256: str | None = None  # of the input model file
    stage1: onnx.ModelProto | None = None
    model: ir.Model | None = None  # the stage-1 model as IR (read-only for the steps)
    conservative: bool = False  # stage 1 without the optimizer (its output did not match)
    excluded: set[str] = field(default_factory=set)
    plan: Any = None  # qdq.plan.QuantPlan of the stage-1 model
    data: Any = None  # dataset.DataSource
    reference: Any = None  # verify.Reference: first sample and the input model's outputs
    calibrator: Any = None
    ranges_by_method: dict = field(default_factory=dict)  # shared by autotune's forks
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    range_selection: Any = None  # algorithms.loss_aware.Selection (the auto method)
    bias_corrections: Any = None  # algorithms.bias_correction.Corrections
    accuracy_samples: list | None = None  # the samples the accuracy steps measure on (read once)
    equalization: Any = None  # algorithms.equalization.Equalization (stage 1)
    smoothing: Any = None  # algorithms.smooth_quant.Smoothing
    rounding: Any = None  # algorithms.adaround.Rounding
    accuracy_references: list | None = None  # float outputs on the accuracy samples (the checks' reference)
    # (stage-1 model id, ranges, kept-float nodes) -> (that model, its quantized outputs' per-sample
    # (signal, noise) on the accuracy samples): the bias-correction check and auto's whole-model pick
    # often score the same one
    output_scores: dict = field(default_factory=dict)
    protected: list[dict] = field(default_factory=list)
    keep_float: dict[str, str] = field(default_factory=dict)  # node -> reason, beyond exclude
    outcome: Any = None  # quantize.QuantizeOutcome
    tensor_report: dict | None = None
    fusion: Any = None  # fusion.FusionReport: what onnxruntime runs in integer kernels
    io: list[dict] = field(default_factory=list)  # integer inputs/outputs made by the editor
    transaction: Transaction = field(default_factory=Transaction)
    written: Written | None = None
    autotune: dict | None = None
    summary: Any = None

    pipeline: tuple = ()  # the steps this run runs (pipeline.steps_for its mode)
    hessians: dict | None = None  # weight-only GPTQ: {activation: X^T X}
    reference_model: Any = None  # the model the references ran (the input model, or stage 1)
    strict_violations: list[str] = field(default_factory=list)  # what `strict` turns into an error
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)

    @property
    def source_path(self) -> Path | None:
        return Path(self.source) if isinstance(self.source, (str, os.PathLike)) else None

    def fork(self, **changes) -> Context:
        """A copy for one more quantization of the same calibration (autotune's trials):
        shares the models, statistics and caches; owns its notes, timings and results."""
        forked = copy.copy(self)
        forked.notes, forked.timings, forked.steps = list(self.notes), dict(self.timings), list(self.steps)
        forked.protected, forked.keep_float, forked.io = [], dict(self.keep_float), list(self.io)
        forked.strict_violations = list(self.strict_violations)
        for name, value in changes.items():
            setattr(forked, name, value)
        return forked
