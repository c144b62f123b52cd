"""Sharded calibration: `quantize calibrate --shard I/N` states, merged, are one run over all."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from conftest import SAMPLE_CALIB, SAMPLE_MODEL
from quantizer import DataOptions, DataSpec, UsageError
from quantizer.calibration_state import load_state
from quantizer.cli.main import cli
from quantizer.dataset import shard_positions
from quantizer.pipeline import calibrate_model


@given(st.integers(0, 500), st.integers(1, 40))
def test_shards_partition_the_samples_in_order(total, count):
    blocks = [shard_positions(total, i, count) for i in range(count)]
    assert [p for block in blocks for p in block] == list(range(total))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def _states_equal(a, b) -> bool:
    return a.fingerprint == b.fingerprint and a.samples == b.samples and a.statistics == b.statistics


def test_cli_shard_states_merged_give_the_same_state_and_model_bytes(tmp_path):
    runner = CliRunner()
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.npz")
        r = runner.invoke(cli, ["calibrate", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
                                "--save-calibration", str(shards[-1]), "--shard", f"{i}/3"])
        assert r.exit_code == 0, r.output
        assert f"(shard {i}/3)" in r.output
    r = runner.invoke(cli, ["calibrate", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
                            "--save-calibration", str(tmp_path / "all.npz"), "-q"])
    assert r.exit_code == 0, r.output
    parts = [load_state(s) for s in shards]
    assert [p.samples for p in parts] == [21, 21, 22]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert _states_equal(merged, load_state(tmp_path / "all.npz"))
    for method in ("min_max_asym", "entropy_asym"):
        single, joined = tmp_path / f"single_{method}.onnx", tmp_path / f"merged_{method}.onnx"
        # (bias correction measures on samples, which merged states alone do not have)
        r = runner.invoke(cli, [str(SAMPLE_MODEL), "--calib", method, "--data", str(SAMPLE_CALIB), "-o", str(single), "-q",
                                "--no-bias-correction"])
        assert r.exit_code == 0, r.output
        loads = [arg for s in shards for arg in ("--load-calibration", str(s))]
        r = runner.invoke(cli, [str(SAMPLE_MODEL), "--calib", method, *loads, "-o", str(joined), "-q",
                                "--no-bias-correction"])
        assert r.exit_code == 0, r.output
        assert single.read_bytes() == joined.read_bytes()


@pytest.mark.parametrize("shard", ["3/3", "-1/2", "1", "a/b", "0/0"])
def test_cli_bad_shard_is_a_usage_error(tmp_path, shard):
    r = CliRunner().invoke(cli, ["calibrate", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB),
                                 "--save-calibration", str(tmp_path / "s.npz"), "--shard", shard])
    assert r.exit_code == 2
    assert "--shard" in r.output and "0..N-1" in r.output
    assert not (tmp_path / "s.npz").exists()


def test_python_shards_after_max_samples_and_shuffle():
    options = DataOptions(max_samples=10, shuffle_seed=3)
    whole = calibrate_model(SAMPLE_MODEL, DataSpec(SAMPLE_CALIB, options))
    parts = [calibrate_model(SAMPLE_MODEL, DataSpec(SAMPLE_CALIB, options.updated(shard=(i, 4)))) for i in range(4)]
    assert [p.samples for p in parts] == [2, 3, 2, 3]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert _states_equal(merged, whole)
    with pytest.raises(UsageError, match="`shard` index must be in 0..3"):
        DataOptions(shard=(4, 4))
