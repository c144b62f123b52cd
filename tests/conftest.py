import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = ROOT / "sample_models" / "digits_cnn.onnx"
SAMPLE_CALIB = ROOT / "sample_models" / "digits_calib"
SAMPLE_TEST = ROOT / "sample_models" / "digits_test.npz"


def run(model, feed):
    """Run a ModelProto (or path) in onnxruntime; return the first output."""
    source = model if isinstance(model, (str, Path)) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"]).run(None, feed)[0]


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - approx) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


@pytest.fixture(scope="session")
def digits_test():
    data = np.load(SAMPLE_TEST)
    return data["x"], data["y"]


class FakeEval:
    """An autotune evaluation with a known metric per call: the float model first, then one
    value per trial."""

    def __init__(self, *values):
        self.values, self.models = iter(values), []

    def __call__(self, model):
        import onnx

        assert isinstance(model, onnx.ModelProto)
        self.models.append(model)
        return next(self.values)


@pytest.fixture
def count_collections(monkeypatch):
    """The calibrators that collected data, in order (each one's ``samples_seen`` after the run)."""
    from quantizer import Calibrator

    calls = []
    original = Calibrator.collect_data

    def counting(self, dataset, **options):
        calls.append(self)
        return original(self, dataset, **options)

    monkeypatch.setattr(Calibrator, "collect_data", counting)
    return calls
