"""Stage 2: run the float model over calibration samples, one at a time, and reduce every
activation that the QDQ plan quantizes to streaming statistics."""

from __future__ import annotations

import copy
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from quantizer.calibrators import CalibrationMethod, TensorStatistics, range_function
from quantizer.calibrators.statistics import BatchedUpdates

from . import runtime
from .calibration_state import (
    CalibrationState,
    load_state,
    model_fingerprint,
    save_state,
)
from .checks import ort_message
from .dataset import count_samples, input_specs, iter_named_samples
from .errors import CalibrationDataError, ModelError, calibrator_errors
from .model_io import load_model
from .qdq.plan import build_plan


# onnxruntime's idle threads spin for work by default: right for back-to-back small runs
# (silero-vad, 4577 samples of 768 values: collect 3.4 s spinning, 4.1 s sleeping), wrong when
# the statistics of large activations want a core meanwhile (PP-OCRv5 det 3.7 -> 3.3 s, rec
# 5.3 -> 4.5 s with sleeping threads; min of 3 interleaved runs each).
SLEEP_FROM_VALUES = 1 << 14


def sample_values(sample) -> int:
    """The number of input values of a sample (a dict of arrays)."""
    return sum(np.asarray(a).size for a in sample.values())


class Calibrator:
    """Collect activation statistics for ``model`` (a stage-1 optimized model).

    ``collect_data`` may be called repeatedly; every call streams its samples through
    onnxruntime and folds them into the running statistics.  ``compute_range`` returns
    ``{tensor: (min, max)}`` for the chosen method.
    """

    def __init__(self, model, method="MIN_MAX_ASYM", percentage: float = 99.99,
                 exclude: Iterable[str] = (), show_progress: bool | None = None,
                 keep_histograms: bool | None = None, tensors: Iterable[str] | None = None,
                 threads: int | None = None):
        self.model = load_model(model)
        with calibrator_errors():
            self.method = CalibrationMethod.parse(method)
        self.percentage = percentage
        self.show_progress = show_progress
        if tensors is None:  # the plan says what to observe (given by the pipeline, which has it)
            tensors = build_plan(ir.from_proto(self.model), set(exclude)).calibrated_tensors
        self.tensors = list(tensors)
        self.specs = input_specs(self.model)
        # MIN_MAX alone needs no histogram; keep them when the state may be reused.
        histograms = keep_histograms if keep_histograms is not None else self.method.family != "MIN_MAX"
        self.statistics = {name: TensorStatistics(with_histogram=histograms) for name in self.tensors}
        self.fingerprint = model_fingerprint(self.model)
        self.keep_histograms = histograms
        self.samples_seen = 0
        self.nonfinite_samples: list[str] = []  # samples whose inputs hold NaN/Inf
        self.threads = threads  # onnxruntime intra-op threads (None: its default)
        self._session = None

    def fresh(self) -> "Calibrator":
        """A calibrator of the same model and tensors with empty statistics, sharing this
        one's onnxruntime session (a cluster worker keeps one session per model)."""
        other = copy.copy(self)
        other.statistics = {name: TensorStatistics(with_histogram=self.keep_histograms) for name in self.tensors}
        other.samples_seen, other.nonfinite_samples = 0, []
        return other

    @property
    def state(self) -> CalibrationState:
        return CalibrationState(self.fingerprint, self.samples_seen, self.statistics)

    def save_state(self, path, transaction=None) -> None:
        """Write the statistics so another method's ranges need no model run."""
        save_state(self.state, path, transaction=transaction)

    def load_state(self, state) -> None:
        """Merge a saved state (path or CalibrationState) into this calibrator's."""
        loaded = load_state(state) if not isinstance(state, CalibrationState) else state
        if loaded.fingerprint != self.fingerprint:
            raise CalibrationDataError(
                "the calibration state was collected on a different model (fingerprint "
                f"{loaded.fingerprint[:12]} != {self.fingerprint[:12]}); collect it again for this model"
            )
        merged = self.state.merge(loaded)
        self.statistics, self.samples_seen = merged.statistics, merged.samples

    def session(self, sample_size: int | None = None) -> ort.InferenceSession:
        """The calibration session: the graph outputs plus every observed tensor.  The
        first call decides whether onnxruntime's idle threads spin for work (its default)
        or sleep, from ``sample_size``, the input values of a typical sample (None:
        large): a sample of at least SLEEP_FROM_VALUES gets sleeping threads, because its
        statistics need a core while onnxruntime runs the next one."""
        if self._session is None:
            inputs = {s.name for s in self.specs}
            self._outputs = [t for t in self.tensors if t not in inputs]
            spinning = sample_size is not None and sample_size < SLEEP_FROM_VALUES
            try:
                self._session = runtime.session(self.model, extra_outputs=self._outputs, threads=self.threads,
                                                spinning=spinning)
            except Exception as exc:
                raise ModelError(
                    f"onnxruntime cannot load the model: {ort_message(exc)}; calibration needs a model that "
                    "runs in onnxruntime (custom ops must be registered with it)"
                ) from exc
        return self._session

    def collect_data(self, dataset, client=None) -> None:
        """Stream ``dataset`` (a folder, or an iterable of dicts/sequences/arrays).

        With ``client`` (a ``dask.distributed.Client``), the samples are calibrated on its
        cluster's workers and the states merged here: the result is bit for bit that of
        this process reading them (quantizer.distributed; the data must be a path every
        worker reads)."""
        bar = tqdm(total=count_samples(dataset), desc="calibrating", unit="sample",
                   disable=not self._progress_enabled(), leave=False)
        try:
            if client is not None:
                from .distributed import collect_on_cluster

                state, nonfinite = collect_on_cluster(self, dataset, client, on_sample=lambda: bar.update())
                self.load_state(state)
                self.nonfinite_samples.extend(nonfinite)
            else:
                self.collect_named(iter_named_samples(dataset, self.specs), on_sample=lambda name: bar.update())
        finally:
            bar.close()

    def _progress_enabled(self) -> bool:
        return self.show_progress if self.show_progress is not None else sys.stderr.isatty()

    def collect_named(self, samples: Iterable, on_sample=None) -> None:
        """Fold ``(name, checked sample)`` pairs into the statistics; ``on_sample(name)``
        after each.  A sample onnxruntime fails on raises CalibrationDataError naming it.

        The statistics of sample i are computed on a second thread while onnxruntime runs
        sample i + 1 (both release the GIL for their heavy loops), so at most two samples'
        activations are alive at once; small tensors are added in batches (BatchedUpdates).
        The statistics are exactly those of one sample at a time, in order."""
        samples = iter(samples)
        first = next(samples, None)
        if first is None:
            return
        session = self.session(sample_values(first[1]))
        samples = itertools.chain([first], samples)
        inputs = [s.name for s in self.specs if s.name in self.statistics]
        batches = {name: BatchedUpdates(stats) for name, stats in self.statistics.items()}

        def fold(name, sample, outputs) -> None:
            if not all(np.isfinite(a).all() for a in sample.values() if a.dtype.kind == "f"):
                self.nonfinite_samples.append(name)
            for tensor, array in zip(self._outputs, outputs):
                batches[tensor].add(array)
            for tensor in inputs:
                batches[tensor].add(sample[tensor])
            self.samples_seen += 1

        folding = None  # the previous sample's statistics, being computed
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration-statistics") as statistics:
            try:
                for name, sample in samples:
                    try:
                        outputs = session.run(self._outputs, sample)
                    except Exception as exc:
                        raise CalibrationDataError(
                            f"onnxruntime failed on calibration sample {name}: "
                            f"{ort_message(exc)}; check that sample's shapes and values against the model"
                        ) from exc
                    if folding is not None:
                        folding[0].result()
                        if on_sample is not None:
                            on_sample(folding[1])
                    folding = (statistics.submit(fold, name, sample, outputs), name)
                    del outputs, sample
                if folding is not None:
                    folding[0].result()
                    if on_sample is not None:
                        on_sample(folding[1])
            finally:
                if folding is not None:
                    folding[0].cancel()
        for batch in batches.values():
            batch.flush()

    def compute_range(self, method=None) -> dict[str, tuple[float, float]]:
        """Ranges by this calibrator's method, or by ``method``: one collected state
        serves every method (histogram methods need ``keep_histograms``)."""
        with calibrator_errors():
            method = CalibrationMethod.parse(method) if method is not None else self.method
            range_fn = range_function(method)
        if self.samples_seen == 0:
            raise CalibrationDataError("no calibration samples were given")
        ranges = {}
        for name in self.tensors:
            stats = self.statistics.get(name)
            if stats is None:
                continue  # not in a loaded state: its nodes stay float
            if stats.count == 0:
                hint = ""
                if self.nonfinite_samples:
                    hint = (f"; {len(self.nonfinite_samples)} sample(s) have NaN/Inf inputs (first: "
                            f"{self.nonfinite_samples[0]}), which spread through the model: clean or drop them")
                raise CalibrationDataError(
                    f"tensor '{name}' had no finite values (all NaN/Inf) in any calibration sample{hint}"
                )
            if not stats.with_histogram and method.family != "MIN_MAX":
                raise CalibrationDataError(
                    f"the calibration state has no histograms (collected for min_max); "
                    f"collect again to use {method.value.lower()}"
                )
            with calibrator_errors():
                low, high = range_fn(stats, method.symmetric, percentage=self.percentage)
            ranges[name] = (float(low), float(high))
        return ranges
