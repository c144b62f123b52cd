"""autotune's algorithm trials: after the calibration methods and before the 16-bit and
float fallbacks, equalization, SmoothQuant and AdaRound as trials of their own, skipped
(without a trial) where they have nothing to change."""

import importlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from builders import _init, make_model
from conftest import SAMPLE_CALIB, SAMPLE_MODEL, FakeEval, run, sqnr_db
from quantizer import UsageError, autotune
from quantizer.cli.main import cli

autotune_module = importlib.import_module("quantizer.autotune")  # the package's `autotune` is the function

SHAPE = (1, 3, 12, 12)
FLOAT_DB = 60.0  # the metric's cap: the float model's own "SQNR"
GOAL_DB = 20.0
CALIBRATION = 12  # samples (the accuracy steps measure on 8 of them)
TOLERABLE = (FLOAT_DB - GOAL_DB) / FLOAT_DB  # metric >= 20 dB passes


def disparate_chain(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Tanh -> Conv, the first layer's channels 1000x apart in scale
    and the second undoing it (as BatchNorm folding leaves such layers): one per-tensor
    scale for the Relu's output crushes the small channels whatever the range, and
    equalization (exact in float) balances them."""
    rng = np.random.default_rng(seed)
    c = 8
    gains = np.geomspace(0.05, 50.0, c).astype(np.float32)
    w1 = (rng.normal(0, 1, (c, 3, 3, 3)) * gains[:, None, None, None]).astype(np.float32)
    w2 = (rng.normal(0, 1, (c, c, 1, 1)) / gains[None, :, None, None]).astype(np.float32)
    w3 = rng.normal(0, 0.5, (4, c, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["y1"], name="first", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y1"], ["h1"], name="act"),
             helper.make_node("Conv", ["h1", "w2", "b2"], ["y2"], name="second"),
             helper.make_node("Tanh", ["y2"], ["h2"], name="tanh"),
             helper.make_node("Conv", ["h2", "w3", "b3"], ["y"], name="third", pads=[1, 1, 1, 1])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
                      [_init("w1", w1), _init("b1", np.zeros(c, np.float32)), _init("w2", w2),
                       _init("b2", np.zeros(c, np.float32)), _init("w3", w3), _init("b3", np.zeros(4, np.float32))])


def samples(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, SHAPE).astype(np.float32)} for _ in range(count)]


def sqnr_metric(model: onnx.ModelProto, held_out: list[dict]):
    """The mean output SQNR against ``model`` on ``held_out`` (capped: float's is infinite)."""
    references = [run(model, s) for s in held_out]

    def metric(candidate: onnx.ModelProto) -> float:
        return min(FLOAT_DB, float(np.mean([sqnr_db(r, run(candidate, s)) for r, s in zip(references, held_out)])))

    return metric


def calibrated(calibrators) -> list[int]:
    """The samples each calibration of a run saw (the checks' probes, on the 8 accuracy samples, too)."""
    return [calibrator.samples_seen for calibrator in calibrators]


@pytest.fixture(scope="module")
def chain():
    model = disparate_chain()
    return model, samples(CALIBRATION, 1), sqnr_metric(model, samples(6, 2))


def test_an_equalization_trial_meets_the_goal_the_methods_miss_with_no_node_float(chain):
    model, calib, metric = chain
    result = autotune(model, calib, metric, tolerable_loss=TOLERABLE, max_trials=12, show_progress=False)
    methods = result.trials[:6]
    assert [t.method for t in methods] == ["auto", "min_max_asym", "percentile_asym", "entropy_asym", "mse_asym",
                                           "sqnr_asym"]
    assert all(not t.passed and t.metric < 5.0 and not t.algorithms for t in methods)  # measured 2.7-2.8 dB
    best_method = max(methods, key=lambda t: t.metric).method
    assert result.passed and result.best is result.trials[-1] and result.best.number == 7
    assert result.best.algorithms == ["equalize"] and result.best.excluded == [] and result.best.wide == []
    assert result.best.method == best_method and result.best.metric > 25.0  # measured 27.1 dB
    assert metric(result.model) == pytest.approx(result.best.metric)
    summary = result.summary
    assert summary["equalization"]["pairs"] == 1 and summary["equalization"]["kept"] is True
    assert summary["autotune"]["chosen_trial"] == 7 and summary["autotune"]["trials"][6]["algorithms"] == ["equalize"]
    assert summary["autotune"]["algorithms"] == ["equalize", "smooth_quant", "adaround"]
    assert summary["autotune"]["skipped"] == []  # a passing trial ends the search before SmoothQuant's turn
    assert not any(f["reason"] == autotune_module.FALLBACK_REASON for f in summary["nodes"]["float"])

    plain = autotune(model, calib, metric, tolerable_loss=TOLERABLE, max_trials=12, algorithms=(),
                     show_progress=False)
    assert plain.passed and all(not t.algorithms for t in plain.trials)
    assert len(plain.best.excluded) == 2 > len(result.best.excluded)  # 'first' and 'second' float
    assert all(not t.passed for t in plain.trials if len(t.excluded) < 2)  # one node float: 4.4 dB


def test_the_algorithm_trial_calibrates_again_even_from_a_one_shot_iterator(chain, count_collections):
    model, calib, metric = chain
    listed = autotune(model, calib, metric, tolerable_loss=TOLERABLE, max_trials=7, show_progress=False)
    assert calibrated(count_collections).count(CALIBRATION) == 2  # the methods' calibration, equalization's
    count_collections.clear()
    once = autotune(model, iter(calib), metric, tolerable_loss=TOLERABLE, max_trials=7, show_progress=False)
    assert calibrated(count_collections).count(CALIBRATION) == 2  # the iterator's samples held for the second
    assert [(t.algorithms, t.metric) for t in once.trials] == [(t.algorithms, t.metric) for t in listed.trials]
    assert once.passed and once.summary["calibration"]["samples"] == CALIBRATION


def test_a_one_shot_iterator_too_large_to_hold_skips_the_trials_that_calibrate_again(chain, monkeypatch):
    model, calib, _ = chain
    monkeypatch.setattr(autotune_module, "REPLAY_BUDGET", 1000)  # bytes: not one sample
    fake = FakeEval(1.0, 0.5, 0.5, 0.5)
    result = autotune(model, iter(calib), fake, max_trials=3, methods=("min_max_asym",),
                      algorithms=("equalize", "adaround"), show_progress=False)
    assert [t.algorithms for t in result.trials] == [[], ["adaround"], []]  # AdaRound shares the calibration
    assert result.trials[2].excluded  # then the fallback
    (skipped,) = result.skipped
    assert skipped.algorithms == ["equalize"] and "one-shot iterator" in skipped.reason


def test_an_algorithm_with_nothing_to_change_is_skipped_without_a_trial(count_collections):
    fake = FakeEval(1.0, 0.5, 0.6, 0.7)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, max_trials=3, methods=("min_max_asym",),
                      algorithms=("smooth_quant",), show_progress=False)
    assert len(result.trials) == 3 and len(fake.models) == 4  # float, the method, two fallbacks
    assert not any(t.algorithms for t in result.trials) and result.trials[1].excluded  # no trial for SmoothQuant
    assert [s.as_dict() for s in result.skipped] == [
        {"algorithms": ["smooth_quant"], "reason": "no quantized MatMul/Gemm activation input it can smooth"}]
    assert result.summary["autotune"]["skipped"] == [s.as_dict() for s in result.skipped]
    assert len(count_collections) == 1  # and no calibration


def test_an_algorithm_its_own_check_drops_is_skipped_without_a_trial(count_collections):
    """The first layer kept float, its input's disparate channels are not quantized: the
    equalization only makes the activation between the layers worse, and its check (before
    calibration) drops it."""
    from test_equalization import _balanced_activations_model, _scaled_samples

    model, calib = _balanced_activations_model(), _scaled_samples(CALIBRATION, 1)
    fake = FakeEval(1.0, 0.5, 0.5)
    result = autotune(model, calib, fake, max_trials=2, methods=("min_max_asym",), exclude=["first"],
                      algorithms=("equalize",), show_progress=False)
    # one trial: the only fallback (keeping "second" float too) would leave no node quantized
    assert [t.algorithms for t in result.trials] == [[]] and not result.trials[0].excluded
    (skipped,) = result.skipped
    assert skipped.algorithms == ["equalize"] and skipped.reason.startswith("equalize: dropped: output SQNR")
    assert calibrated(count_collections).count(CALIBRATION) == 1  # dropped before the trial's calibration


def test_already_configured_algorithms_are_in_every_trial_and_not_tried_again():
    from quantizer.config import QuantizationConfig

    fake = FakeEval(1.0, 0.5, 0.5)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, max_trials=2, methods=("min_max_asym",),
                      config=QuantizationConfig(equalize=True), algorithms=("equalize",), show_progress=False)
    assert [s.reason for s in result.skipped] == ["already on in every trial (`equalize`)"]
    assert [t.algorithms for t in result.trials] == [[], []] and result.summary["equalization"]["pairs"] == 1


@pytest.mark.parametrize("max_trials, expected, skipped", [
    (2, [[], ["equalize"]], []),  # the trials ran out before SmoothQuant's turn
    (4, [[], ["equalize"], ["adaround"], ["equalize", "adaround"]], [["smooth_quant"]]),  # nothing to smooth
])
def test_max_trials_bounds_the_algorithm_trials(max_trials, expected, skipped, count_collections):
    fake = FakeEval(1.0, *[0.5] * 10)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, max_trials=max_trials, methods=("min_max_asym",),
                      show_progress=False)
    assert [t.algorithms for t in result.trials] == expected
    assert len(fake.models) == max_trials + 1 and all(not t.excluded for t in result.trials)
    assert [s.algorithms for s in result.skipped] == skipped
    seen = calibrated(count_collections)
    assert seen.count(max(seen)) == 2  # equalization's calibration serves its AdaRound too


def disparate_matmuls(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul -> MatMul, the first one's output channels 1000x apart and the second
    undoing it: equalization balances the pair, and SmoothQuant can fold its division into
    the first MatMul's columns."""
    rng = np.random.default_rng(seed)
    gains = np.geomspace(0.05, 50, 16).astype(np.float32)
    w0 = (rng.normal(0, 0.3, (16, 16)) * gains[None, :]).astype(np.float32)
    w1 = (rng.normal(0, 0.3, (16, 8)) / gains[:, None]).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["t"], name="mm0"),
             helper.make_node("MatMul", ["t", "w1"], ["y"], name="mm1")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])],
                      [_init("w0", w0), _init("w1", w1)])


def test_each_algorithm_alone_then_together_with_its_own_calibration(count_collections):
    model = disparate_matmuls()
    rng = np.random.default_rng(1)
    calib = [{"x": rng.normal(0, 1, (2, 5, 16)).astype(np.float32)} for _ in range(CALIBRATION)]
    held_out = [{"x": rng.normal(0, 1, (2, 5, 16)).astype(np.float32)} for _ in range(6)]
    result = autotune(model, calib, sqnr_metric(model, held_out), tolerable_loss=0.01, max_trials=5,
                      methods=("min_max_asym",), show_progress=False)
    trials = result.trials
    assert [t.algorithms for t in trials] == [[], ["equalize"], ["smooth_quant"], ["adaround"],
                                              ["equalize", "smooth_quant", "adaround"]]
    assert not result.passed and result.skipped == [] and all(not t.excluded for t in trials)
    assert trials[0].metric < trials[3].metric < 10.0  # measured 1.6 dB plain, 3.5 dB AdaRound alone
    assert min(t.metric for t in trials[1:3] + trials[4:]) > 30.0  # 36.9 equalized, 37.4 smoothed, 37.0 together
    assert result.best is trials[2] and result.summary["calibration"]["smooth_quant"]["kept"]  # the best metric
    # the methods' calibration, then one each for equalization, SmoothQuant and the two together;
    # AdaRound alone shares the methods' calibration
    assert calibrated(count_collections).count(CALIBRATION) == 4


def test_the_fallback_starts_from_the_best_trial_algorithm_trials_included():
    # float, min_max, equalize (the best), adaround, both, then two fallback trials
    fake = FakeEval(1.0, 0.5, 0.8, 0.6, 0.7, 0.5, 0.5)
    result = autotune(SAMPLE_MODEL, SAMPLE_CALIB, fake, max_trials=6, methods=("min_max_asym",),
                      show_progress=False)
    fallbacks = result.trials[4:]
    assert [t.algorithms for t in result.trials[:4]] == [[], ["equalize"], ["adaround"], ["equalize", "adaround"]]
    assert all(t.algorithms == ["equalize"] and t.excluded for t in fallbacks)
    assert len(fallbacks[1].excluded) > len(fallbacks[0].excluded)
    assert result.best.number == 2 and fake.models[2] is result.model
    assert result.summary["equalization"]["kept"] is True


def test_unknown_algorithms_are_refused():
    with pytest.raises(UsageError, match="`algorithms`: unknown accuracy algorithm 'bias'"):
        autotune(SAMPLE_MODEL, SAMPLE_CALIB, FakeEval(1.0), algorithms=("bias",))


def _tune_files(tmp_path, model, calib, held_out):
    """The model, a folder of its calibration samples and an evaluation script (the
    metric of ``sqnr_metric``, in the script's own words)."""
    model_path = tmp_path / "chain.onnx"
    onnx.save(model, model_path)
    data = tmp_path / "calib"
    data.mkdir()
    for i, sample in enumerate(calib):
        np.save(data / f"s{i}.npy", sample["x"])
    np.save(tmp_path / "held.npy", np.stack([s["x"] for s in held_out]))
    script = tmp_path / "evaluate.py"
    script.write_text(
        "import numpy as np, onnxruntime as ort\n"
        f"held = np.load({str(tmp_path / 'held.npy')!r})\n"
        "def outputs(path):\n"
        "    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    return [session.run(None, {'x': x})[0].astype(np.float64) for x in held]\n"
        f"reference = outputs({str(model_path)!r})\n"
        "def evaluate(model_path):\n"
        "    db = [10 * np.log10(np.sum(r ** 2) / max(np.sum((r - q) ** 2), 1e-30))\n"
        "          for r, q in zip(reference, outputs(model_path))]\n"
        f"    return min({FLOAT_DB}, float(np.mean(db)))\n")
    return model_path, data, script


def test_cli_tune_algorithms_flag(tmp_path, chain):
    model, calib, _ = chain
    model_path, data, script = _tune_files(tmp_path, model, calib, samples(6, 2))
    out, report = tmp_path / "tuned.onnx", tmp_path / "tune.json"
    common = [str(model_path), "--data", str(data), "--eval", str(script), "--tolerable-loss", str(TOLERABLE),
              "--calib", "min_max_asym", "-o", str(out), "--report", str(report)]
    r = CliRunner().invoke(cli, ["tune", *common, "--tune-algorithms", "smooth-quant,equalize"])
    assert r.exit_code == 0, r.output
    assert "trial 1/10: min_max_asym: metric" in r.output
    assert "trial 2/10: min_max_asym + equalize: metric" in r.output and "-> pass" in r.output
    assert "chose trial 2 (min_max_asym + equalize, 0 fallback nodes float)" in r.output
    tune = json.loads(report.read_text())["autotune"]
    assert [t["algorithms"] for t in tune["trials"]] == [[], ["equalize"]] and tune["passed"]
    assert tune["algorithms"] == ["equalize", "smooth_quant"] and tune["skipped"] == []

    r = CliRunner().invoke(cli, ["tune", *common, "--tune-algorithms", "smooth-quant", "--max-trials", "2"])
    assert r.exit_code == 0, r.output
    assert ("skipped smooth-quant (no trial spent): no quantized MatMul/Gemm activation input it can smooth"
            in r.output)
    tune = json.loads(report.read_text())["autotune"]
    assert [t["algorithms"] for t in tune["trials"]] == [[], []] and tune["trials"][1]["excluded"]
    assert tune["skipped"] == [{"algorithms": ["smooth_quant"],
                                "reason": "no quantized MatMul/Gemm activation input it can smooth"}]

    r = CliRunner().invoke(cli, ["tune", *common, "--tune-algorithms", "none", "--max-trials", "2"])
    assert r.exit_code == 0, r.output
    assert " + " not in r.output and "skipped" not in r.output
    assert json.loads(report.read_text())["autotune"]["algorithms"] == []

    out.unlink()
    report.unlink()
    r = CliRunner().invoke(cli, ["tune", *common, "--tune-algorithms", "equalize,bias"])
    assert r.exit_code == 2
    assert "--tune-algorithms: unknown algorithm 'bias'; use a comma-separated list of equalize, smooth-quant, " \
           "adaround, or none" in r.output and "Traceback" not in r.output
    assert not out.exists() and not report.exists()  # refused before anything is written


def test_the_fallback_never_keeps_every_quantized_node_float(chain):
    # only a model without Q/DQ meets the goal: the fallback grows to every unit, but the
    # trial that would keep every quantized node float (a float copy "passing") is not run
    model, calibration, _ = chain

    def metric(candidate: onnx.ModelProto) -> float:
        return 0.0 if any(n.op_type == "QuantizeLinear" for n in candidate.graph.node) else 1.0

    result = autotune(model, calibration, metric, max_trials=30, methods=("min_max_asym",), algorithms=(),
                      show_progress=False)
    fallbacks = [t for t in result.trials if t.excluded]
    assert not result.passed and all(not t.passed for t in result.trials)
    assert any(n.op_type == "QuantizeLinear" for n in result.model.graph.node)
    assert len(fallbacks) >= 2 and len(result.trials) < 30  # it grew, then stopped short of all float
