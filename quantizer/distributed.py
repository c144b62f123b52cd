"""Calibration on a Dask cluster (the `distributed` extra: ``pip install onnx-int8-quantizer[distributed]``).

The client (this process) runs stage 1, sends the stage-1 model once (its bytes, scattered to
every worker) and gives each task the positions of its samples in the data, a path that
every worker reads (shared storage).  A worker keeps one onnxruntime session per model and
returns the calibration state of its task's samples; the client merges the states in task
order as they arrive.  Histograms live on a global power-of-two grid and merge exactly, so
the merged state is bit for bit the state of one process reading every sample (given the
same onnxruntime and CPU kind: the float activations must be the same).

A task whose worker dies is run again by Dask on another worker (up to the scheduler's
``allowed-failures``); a sample that fails raises the error a local run raises, naming its
file; each worker reports every sample it finishes, so progress counts samples across the
cluster.  Nothing is written beside the input: a local cluster works in a temporary folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import uuid
from importlib import metadata
from typing import Iterator

from .calibration_state import CalibrationState
from .dataset import DataSource, DataSpec, _Stream
from .errors import CalibrationDataError, ModelError, UsageError, first_line

# Tasks per worker thread: enough to balance uneven samples and to lose little work when a
# worker dies; few enough that the states sent back (tensors x 16 KiB each) stay small.
TASKS_PER_THREAD = 4
# Packages whose versions decide the statistics: the same on the client and every worker.
MATCHING_PACKAGES = ("onnx-int8-quantizer", "onnx", "onnxruntime", "numpy")
_TOPIC = "quantizer-calibration-"


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise UsageError("calibration on a cluster (`workers`, `scheduler`, `client`) needs dask.distributed: "
                         "pip install onnx-int8-quantizer[distributed]") from exc
    return distributed


@contextlib.contextmanager
def cluster_client(workers: int | None = None, scheduler: str | None = None) -> Iterator:
    """A Dask client: on a local cluster of ``workers`` processes (one thread each, in a
    temporary folder), or on the cluster whose scheduler listens at ``scheduler``
    (``tcp://host:8786``).  Closed (and the local cluster stopped) on exit."""
    if workers is not None and scheduler is not None:
        raise UsageError("give `workers` (a local cluster) or `scheduler` (an existing one), not both")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UsageError(f"`workers` must be a whole number >= 1, got {workers!r}")
    distributed = _dask()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at `scheduler` {scheduler!r}: {first_line(exc)}") from exc
        with client:
            check_versions(client)
            yield client
        return
    with tempfile.TemporaryDirectory(prefix="quantizer-dask-", ignore_cleanup_errors=True) as folder:
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           local_directory=folder, dashboard_address=None, worker_dashboard_address=None,
                                           silence_logs=logging.ERROR)
        with cluster, distributed.Client(cluster) as client:
            client.wait_for_workers(workers)
            yield client


def _versions() -> dict[str, str | None]:
    found = {}
    for name in MATCHING_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions(client) -> None:
    """Refuse a cluster whose workers have other versions of the packages that decide the
    statistics (MATCHING_PACKAGES) than this process."""
    here = _versions()
    for worker, there in client.run(_versions).items():
        differ = [f"{name} {there.get(name)} (here {version})" for name, version in here.items()
                  if there.get(name) != version]
        if differ:
            raise UsageError(f"Dask worker {worker} has other versions than this process: {', '.join(differ)}; "
                             "install the same versions on every machine")


# -- on a worker -------------------------------------------------------------------------

_CALIBRATORS: dict = {}  # per worker process: the calibrator (and session) of the last model


def _worker_calibrator(model: bytes, fingerprint: str, tensors: tuple, histograms: bool, host_threads: dict):
    from .calibrate import Calibrator

    key = (fingerprint, tensors, histograms)
    if key not in _CALIBRATORS:
        _CALIBRATORS.clear()
        try:  # the host's cores shared among the Dask threads of every worker on it
            worker = _dask().get_worker()
            sharing = host_threads.get(worker.ip, worker.state.nthreads)
            threads = max(1, len(os.sched_getaffinity(0)) // max(1, sharing))
        except (ValueError, AttributeError):
            threads = None
        calibrator = Calibrator(model, tensors=tensors, keep_histograms=histograms, show_progress=False,
                                threads=threads)
        if calibrator.fingerprint != fingerprint:
            raise ModelError("the stage-1 model has another fingerprint on the Dask worker than on the client: "
                             "install the same onnx version on every machine")
        calibrator.session()
        _CALIBRATORS[key] = calibrator
    return _CALIBRATORS[key].fresh()


def calibrate_task(model: bytes, fingerprint: str, tensors: tuple, histograms: bool, host_threads: dict,
                   spec: DataSpec, count: int, positions: tuple, topic: str, task: int):
    """One task: the state of the samples at ``positions`` of ``spec``, and the names of
    those with NaN/Inf inputs.  Reports each finished sample on ``topic``.  onnxruntime
    gets the host's cores divided by ``host_threads[host]``, the Dask threads there."""
    calibrator = _worker_calibrator(model, fingerprint, tensors, histograms, host_threads)
    worker = _dask().get_worker()
    source = DataSource(spec)
    done = iter(positions)
    calibrator.collect_named(source.read_positions(calibrator.specs, positions, count),
                             on_sample=lambda name: worker.log_event(topic, next(done)))
    return calibrator.state, calibrator.nonfinite_samples


# -- on the client -----------------------------------------------------------------------

def _source(dataset) -> DataSource:
    if isinstance(dataset, DataSource):
        return dataset
    if isinstance(dataset, _Stream):
        return dataset.source()
    if isinstance(dataset, (str, os.PathLike, DataSpec)):
        return DataSource(dataset)
    raise UsageError("calibration on a cluster needs the data as a path every worker reads (a folder, a stacked "
                     "file or images on shared storage), not a Python iterable")


def _identity(value):
    return value


def _tasks(order, threads: int) -> list[tuple]:
    count = max(1, min(len(order), threads * TASKS_PER_THREAD))
    return [tuple(int(p) for p in order[i * len(order) // count:(i + 1) * len(order) // count]) for i in range(count)]


def collect_on_cluster(calibrator, dataset, client, on_sample=None) -> tuple[CalibrationState, list[str]]:
    """The calibration state of ``calibrator``'s model over ``dataset``, collected by the
    workers of ``client`` and merged here in task order; and the samples with NaN/Inf inputs.
    ``on_sample()`` is called once per sample a worker finished (progress)."""
    distributed = _dask()

    spec, count, order = _source(dataset).layout(calibrator.specs)
    if not calibrator.model.ByteSize() < 2**31 - 1:
        raise UsageError("calibration on a cluster sends the stage-1 model as bytes, at most 2 GiB; this model is "
                         "larger: calibrate shards with `shard` on each machine and merge the states instead")
    nthreads = client.nthreads()
    threads = sum(nthreads.values())
    if threads == 0:
        raise UsageError("the Dask cluster has no workers")
    host_threads: dict[str, int] = {}
    for address, worker_threads in nthreads.items():
        host = distributed.comm.get_address_host(address)
        host_threads[host] = host_threads.get(host, 0) + worker_threads
    tasks = _tasks(order, threads)
    topic = _TOPIC + uuid.uuid4().hex
    seen: set = set()
    lock = threading.Lock()  # the handler runs on the client's event loop thread

    def progress(event) -> None:
        _, position = event
        with lock:
            if position in seen:  # a task run again after its worker died reports its samples twice
                return
            seen.add(position)
        if on_sample is not None:
            on_sample()

    client.subscribe_topic(topic, progress)
    # The model as a task of its own, not scattered data: when a worker that holds it dies,
    # the scheduler can make it again from the task (scattered data would be lost for good).
    model = client.submit(_identity, calibrator.model.SerializeToString(), key=f"quantizer-model-{topic}", pure=False)
    args = (calibrator.fingerprint, tuple(calibrator.tensors), calibrator.keep_histograms, host_threads, spec, count)
    futures = [client.submit(calibrate_task, model, *args, positions, topic, i, key=f"quantizer-calibrate-{topic}-{i}")
               for i, positions in enumerate(tasks) if positions]
    index = {future.key: i for i, future in enumerate(futures)}
    merged = CalibrationState(calibrator.fingerprint)
    nonfinite: list[str] = []
    arrived: dict[int, tuple] = {}
    following = 0  # the next task to merge: in task order, whatever order they finish in
    try:
        for future in distributed.as_completed(futures):
            task = index[future.key]
            try:
                arrived[task] = future.result()
            except distributed.KilledWorker as exc:
                raise CalibrationDataError(
                    f"calibrating samples {tasks[task][0]}..{tasks[task][-1]} (positions in the data) killed "
                    f"Dask workers again and again ({first_line(exc)}); out of memory?") from exc
            future.release()
            while following in arrived:
                state, names = arrived.pop(following)
                merged = merged.merge(state)
                nonfinite.extend(names)
                following += 1
    except BaseException:
        client.cancel([*futures, model])
        raise
    finally:
        model.release()
        client.unsubscribe_topic(topic)
    with lock:  # every task returned: the reports still on their way are of finished samples
        late = [p for p in order if int(p) not in seen]
        seen.update(int(p) for p in late)
    for _ in late:
        if on_sample is not None:
            on_sample()
    return merged, nonfinite
