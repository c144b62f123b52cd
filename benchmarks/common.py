"""Helpers shared by the benchmark scripts: machine facts, fonts, RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MEMORY_MARKERS = ("MemoryError", "bad_alloc", "Failed to allocate", "Unable to allocate",
                  "Cannot allocate memory", "out of memory")


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


def git_head() -> str:
    """The repository's short HEAD, marked when quantizer/ or calibrators/ have uncommitted
    changes (a result then is not of that commit's code)."""
    repo = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "quantizer", "calibrators"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


# ----------------------------------------------------------------------------- subprocess runs

def publish(section: str, lines: list[str], write: bool) -> None:
    """Print a benchmark's section and, with ``write``, put it into RESULTS.md."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write_results_section(section, text)


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``; onnxruntime's long status messages condensed."""
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", msg)
    alloc = re.search(r"Failed to allocate memory for requested buffer of size (\d+)", msg)
    if alloc:
        msg = f"onnxruntime arena failed to allocate {int(alloc.group(1))} bytes" + (
            f" in {node.group(1)} node '{node.group(2)}'" if node and node.group(2)
            else f" in an unnamed {node.group(1)} node" if node else "")
    elif node and "Status Message:" in msg:
        msg = f"in {node.group(1)} node '{node.group(2)}': " + msg.split("Status Message:", 1)[1].strip()
    return f"{type(exc).__name__}: {msg}"[:300]


def where(exc: BaseException) -> str:
    """The innermost traceback frame inside onnxruntime.quantization or quantizer, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "onnxruntime/quantization" in f.filename or "/quantizer/" in f.filename
              or "/calibrators/" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno} {f.name}"


def run_child(script: Path, spec: dict, work: Path, timeout: float, mem_bytes: int) -> dict:
    """Run one spec in ``python script --one SPEC`` under RLIMIT_AS and a timeout; the child
    writes its result dict to ``spec['result']`` (also when it fails), read back here."""
    spec_path = work / f"spec_{spec['tag']}.json"
    spec["result"] = str(work / f"result_{spec['tag']}.json")
    spec_path.write_text(json.dumps(spec))

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--one", str(spec_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit,
                            cwd=str(work))  # a peer that drops temporary files in its cwd leaves them in the work dir
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - start
    result_file = Path(spec["result"])
    out = json.loads(result_file.read_text()) if result_file.exists() else {"ok": False}
    out["process_seconds"] = wall
    out["returncode"] = proc.returncode
    limit_gib = mem_bytes / 2 ** 30
    if out.get("ok") and timed_out:
        out["eval_error"] = f"evaluation timed out ({timeout:.0f} s for the whole child)"
    elif not out.get("ok"):
        tail = (stderr or "").strip().splitlines()[-1:] or [""]
        if timed_out:
            out["short"] = f"timeout ({timeout:.0f} s)"
            out["error"] = f"timeout after {timeout:.0f} s" + (f" (last stage: {out['stage']})" if "stage" in out else "")
        elif out.get("memory") or any(m in (stderr or "") for m in MEMORY_MARKERS):
            out["short"] = f"MemoryError at {limit_gib:g} GiB limit"
            out["error"] = out.get("error") or tail[0][:300]
        elif "error" not in out:
            out["error"] = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                            else f"exit code {proc.returncode}") + (f": {tail[0][:200]}" if tail[0] else "")
        out["stderr_tail"] = (stderr or "")[-2000:]
    if proc.returncode and out.get("ok") and "eval_error" not in out and not timed_out:
        out["eval_error"] = f"child exit code {proc.returncode}"
    return out
