"""Calibration on a Dask cluster: bit-identical states, byte-identical models, a worker that
dies mid-run, a failing sample named, nothing written beside the input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from click.testing import CliRunner  # noqa: E402
from conftest import SAMPLE_CALIB, SAMPLE_MODEL  # noqa: E402
from quantizer import CalibrationDataError, Calibrator, DataOptions, DataSpec, optimize_model  # noqa: E402
from quantizer.calibration_state import load_state  # noqa: E402
from quantizer.cli.main import cli  # noqa: E402
from quantizer.distributed import cluster_client, collect_on_cluster  # noqa: E402


def _copy_inputs(tmp_path):
    """The model and its data in a folder of their own, to see that nothing lands beside them."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(SAMPLE_MODEL, folder / "model.onnx")
    shutil.copytree(SAMPLE_CALIB, folder / "calib")
    return folder, folder / "model.onnx", folder / "calib"


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _bit_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.minimum, x.maximum, x.count, x.nonfinite, x.level, x.offset, x.with_histogram) == \
               (y.minimum, y.maximum, y.count, y.nonfinite, y.level, y.offset, y.with_histogram), name
        assert x.counts.dtype == y.counts.dtype and np.array_equal(x.counts, y.counts), name


def test_cli_workers_2_gives_the_single_process_bytes(tmp_path):
    folder, model, calib = _copy_inputs(tmp_path)
    before = _listing(folder)
    runner = CliRunner()
    single, cluster = tmp_path / "single.onnx", tmp_path / "cluster.onnx"
    r = runner.invoke(cli, [str(model), "--calib", "entropy_asym", "--data", str(calib), "-o", str(single), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, [str(model), "--calib", "entropy_asym", "--data", str(calib), "-o", str(cluster),
                            "--workers", "2", "--save-calibration", str(tmp_path / "state.npz")])
    assert r.exit_code == 0, r.output
    assert "over 64 samples" in r.output
    assert single.read_bytes() == cluster.read_bytes()
    assert _listing(folder) == before


@pytest.fixture(scope="module")
def client():
    with cluster_client(workers=2) as client:
        yield client


def test_collect_data_with_a_client_is_bit_identical(client):
    model = optimize_model(SAMPLE_MODEL)
    spec = DataSpec(SAMPLE_CALIB, DataOptions(max_samples=40, shuffle_seed=5))
    local = Calibrator(model, keep_histograms=True)
    local.collect_data(spec)
    remote = Calibrator(model, keep_histograms=True)
    remote.collect_data(spec, client=client)
    assert remote.samples_seen == local.samples_seen == 40
    _bit_identical(remote.statistics, local.statistics)


def test_cli_calibrate_on_a_scheduler_and_shards_merge(client, tmp_path):
    address = client.scheduler.address
    runner = CliRunner()
    for name, extra in (("cluster", ["--scheduler", address]), ("local", [])):
        r = runner.invoke(cli, ["calibrate", str(SAMPLE_MODEL), "--data", str(SAMPLE_CALIB), "-q",
                                "--save-calibration", str(tmp_path / f"{name}.npz"), *extra])
        assert r.exit_code == 0, r.output
    cluster, local = load_state(tmp_path / "cluster.npz"), load_state(tmp_path / "local.npz")
    assert cluster.samples == local.samples == 64 and cluster.fingerprint == local.fingerprint
    _bit_identical(cluster.statistics, local.statistics)


def test_a_failing_sample_is_named(client, tmp_path):
    calib = tmp_path / "calib"
    shutil.copytree(SAMPLE_CALIB, calib)
    (calib / "sample_033.npy").write_bytes(b"not an array")
    calibrator = Calibrator(optimize_model(SAMPLE_MODEL))
    with pytest.raises(CalibrationDataError, match="sample_033.npy"):
        calibrator.collect_data(calib, client=client)
    with pytest.raises(Exception, match="Python iterable"):
        calibrator.collect_data([np.zeros((1, 1, 8, 8), np.float32)], client=client)


class KillFirstTask(distributed.WorkerPlugin):
    """Kills its worker process when the first calibration task of the cluster starts."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "quantizer-calibrate" in str(key):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(1)


def test_a_worker_killed_mid_run_is_retried_and_the_result_identical(client, tmp_path):
    model = optimize_model(SAMPLE_MODEL)
    local = Calibrator(model, keep_histograms=True)
    local.collect_data(SAMPLE_CALIB)
    marker = tmp_path / "killed"
    client.register_plugin(KillFirstTask(str(marker)), name="kill-first-task")
    remote = Calibrator(model, keep_histograms=True)
    finished = []
    try:
        state, nonfinite = collect_on_cluster(remote, SAMPLE_CALIB, client, on_sample=lambda: finished.append(1))
    finally:
        client.unregister_worker_plugin("kill-first-task")
    assert marker.exists()  # a worker did die, with a task in hand
    assert state.samples == 64 and nonfinite == []
    assert len(finished) == 64  # progress: each sample once, also those of the task run again
    remote.load_state(state)
    _bit_identical(remote.statistics, local.statistics)
