"""Helpers shared by the benchmark scripts: machine facts, fonts, RESULTS.md sections."""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def font_dir() -> Path:
    """A folder holding DejaVuSans.ttf (system fonts or matplotlib's bundled copy)."""
    candidates = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]
    try:
        import matplotlib
        candidates.append(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "DejaVuSans.ttf").is_file():
            return folder
    raise FileNotFoundError("DejaVuSans.ttf not found in " + ", ".join(map(str, candidates)))


def write_results_section(section: str, text: str) -> None:
    """Create or replace only ``section`` (up to the next '## ' heading) in RESULTS.md."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + text + ("\n" + tail if tail else "")
    RESULTS.write_text(new)
