"""Where the YOLOv8n-style detector loses classes (issue: accuracy algorithms, the 1 % target).

Quantizes the accuracy suite's detector (nudenet 320n) with the default command and with
chosen nodes kept float -- the first Conv (the only one reading the image), the first
SiLU's Mul, the head's data-movement chain that concatenates box and class logits under
one scale -- and reports, on the suite's detector eval crops, the class kept % with its
gap to float (paired bootstrap standard error, as bench_accuracy), the output SQNR of the
whole output and of its class-score rows alone, and, for the flipped anchors, how close
float's top two classes were (a flip on a near-tie is noise, one on a clear margin is not).

    pip install -e ".[bench]"
    flock /work/bench.lock python benchmarks/bench_detector_probe.py [--write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_accuracy import SIZES, session, sqnr_db  # noqa: E402
from common import cpu_model, git_head, publish  # noqa: E402
from tasks import TASKS, paired_gap  # noqa: E402

SECTION = "## Detector: where the class gap goes (issue: accuracy algorithms)"
VARIANTS = {  # label -> node patterns kept float (names of the shipped model)
    "default (auto, ort-cpu)": (),
    "first Conv kept float (reads the image)": ("/model.0/conv/Conv",),
    "first SiLU's Mul kept float": ("/model.0/act/Mul",),
    "head concat/reshape/split kept float": ("/model.22/Concat*", "/model.22/Reshape*", "/model.22/Split*"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    from quantizer import quantize_model
    from quantizer.config import QuantizationConfig

    task = TASKS["detector"]
    work = Path(tempfile.mkdtemp(prefix="bench-detector-probe-"))
    info = task.build(work, *SIZES["detector"])
    model_path, calib = str(task.model_path()), str(work / "calib")
    float_session = session(model_path)
    _, (reference,) = task.evaluate(float_session, work)
    float_units = task.units
    top2 = np.sort(reference[:, 4:], axis=1)[:, -2:]
    confident = top2[:, 1] >= task.threshold
    rel_margin = (top2[:, 1] - top2[:, 0]) / np.maximum(top2[:, 1], 1e-12)

    rows = []
    for label, exclude in VARIANTS.items():
        start = time.perf_counter()
        result = quantize_model(model_path, calib, config=QuantizationConfig(exclude=exclude), show_progress=False)
        seconds = time.perf_counter() - start
        s = session(result.model)
        kept, (outputs,) = task.evaluate(s, work)
        gap, se = paired_gap(task, task.units, float_units)
        flipped = (outputs[:, 4:].argmax(1) != reference[:, 4:].argmax(1)) & confident
        near = int((rel_margin[flipped] < 0.05).sum())
        floated = len(result.summary.nodes.float)
        rows.append(f"| {label} | {kept:.2f} | {gap:+.2f} +- {se:.2f} | {sqnr_db([reference], [outputs]):.2f} | "
                    f"{sqnr_db([reference[:, 4:]], [outputs[:, 4:]]):.2f} | {int(flipped.sum())} ({near}) | "
                    f"{floated} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    lines = [SECTION, "",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; quantizer git "
             f"{git_head()}; {cpu_model()}, Python {platform.python_version()}, onnxruntime "
             f"{__import__('onnxruntime').__version__}",
             "- Command: `flock /work/bench.lock python benchmarks/bench_detector_probe.py --write`",
             f"- Data: the accuracy suite's detector data ({info['calib']}; {info['eval']}); float keeps 100 % by "
             "definition", "",
             "| run | class kept % | gap to float +- SE | output SQNR dB | class rows SQNR dB | flipped anchors "
             "(of them near-ties, top-2 within 5 %) | float nodes | quantize s |",
             "|---|---|---|---|---|---|---|---|", *rows, ""]
    publish(SECTION, lines, args.write)


if __name__ == "__main__":
    main()
