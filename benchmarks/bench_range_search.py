"""Time the histogram range searches (PERCENTILE, ENTROPY, MSE, SQNR x _SYM/_ASYM).

Builds TensorStatistics from synthetic distributions of 1M values each (fed in chunks
below the histogram's subsampling cap, so every value is counted) and prints, per method,
the median time per tensor over ``--repeats`` runs as markdown tables: CPU time of this
process (what the search costs; robust to other load on the machine) and wall time.
Targets: <= 10 ms for the 1-D searches (every _SYM, PERCENTILE_ASYM), <= 50 ms for the
2-D _ASYM searches.  The searches are single-threaded numpy, so on an idle machine the
two tables agree.

    python benchmarks/bench_range_search.py [--repeats 15] [--values 1000000]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from quantizer.calibrators import histogram_methods, statistics
from quantizer.calibrators.statistics import TensorStatistics

METHODS = {
    "PERCENTILE": histogram_methods.percentile_range,
    "ENTROPY": histogram_methods.entropy_range,
    "MSE": histogram_methods.mse_range,
    "SQNR": histogram_methods.sqnr_range,
}
TARGET_MS = {True: 10.0, False: 50.0}  # keyed by "is a 1-D search"


def distributions(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    laplace = rng.laplace(0.0, 1.0, n)
    laplace[rng.choice(n, 20, replace=False)] = rng.uniform(20, 60, 20) * rng.choice([-1, 1], 20)
    return {
        "gaussian": rng.normal(0.3, 1.7, n),
        "laplace+outliers": laplace,
        "relu": np.maximum(rng.normal(0.2, 1.0, n), 0.0),
        "bimodal": np.concatenate([rng.normal(-2.0, 0.4, n // 3), rng.normal(3.0, 0.8, n - n // 3)]),
        # spans 2047 bins of width 2**-10: the largest histogram the statistics produce
        "uniform-2047-bins": rng.uniform(-1.0, 0.999, n),
    }


def statistics_of(values: np.ndarray) -> TensorStatistics:
    stats = TensorStatistics()
    cap = getattr(statistics, "HISTOGRAM_SAMPLE_CAP", 1 << 17)
    for start in range(0, values.size, cap):
        stats.update(values[start: start + cap])
    return stats


def median_ms(function, stats, symmetric, repeats: int) -> tuple[float, float]:
    """Median (CPU, wall) milliseconds of one call."""
    function(stats, symmetric)  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        function(stats, symmetric)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return 1e3 * float(np.median(cpu)), 1e3 * float(np.median(wall))


def print_table(title, names, data, rows, column):
    print(f"\n{title}\n")
    print("| method | search | " + " | ".join(f"{n} ({len(data[n].histogram().counts)} bins)" for n in names)
          + " | max | target |")
    print("|---|---|" + "---:|" * (len(names) + 2))
    for label, one_dimensional, cells in rows:
        values = [cell[column] for cell in cells]
        target = TARGET_MS[one_dimensional]
        flag = "" if max(values) <= target else " (over)"
        print(f"| {label} | {'1-D' if one_dimensional else '2-D'} | " + " | ".join(f"{v:.2f}" for v in values)
              + f" | {max(values):.2f}{flag} | {target:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--values", type=int, default=1_000_000)
    args = parser.parse_args()

    data = {name: statistics_of(values) for name, values in distributions(np.random.default_rng(0), args.values).items()}
    names = list(data)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.repeats} runs")
    rows = []
    for family, function in METHODS.items():
        for symmetric in (True, False):
            cells = [median_ms(function, data[n], symmetric, args.repeats) for n in names]
            rows.append((f"{family}_{'SYM' if symmetric else 'ASYM'}", symmetric or family == "PERCENTILE", cells))
    print_table("CPU time, ms per tensor", names, data, rows, 0)
    print_table(f"Wall time, ms per tensor (load average now {os.getloadavg()[0]:.2f})", names, data, rows, 1)


if __name__ == "__main__":
    main()
