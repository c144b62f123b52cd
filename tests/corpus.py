"""Shared helpers of the bad-input corpus: run the CLI, and check a clean failure
(one stderr line, the documented exit code, no traceback, nothing left behind)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import onnx
from click.testing import CliRunner
from quantizer.cli.main import cli

INTERNAL, USAGE, MODEL, DATA, INTERRUPTED = 1, 2, 3, 4, 130


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_clean_failure(result, code, text, out_dir: Path, keep=()):
    """One stderr line with ``text``, exit ``code``, no traceback, nothing in ``out_dir``
    but the files named in ``keep``."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert lines[0].startswith(("error: ", "internal error: ", "interrupted"))
    assert "Traceback" not in result.output and not result.stdout.strip()
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    left = sorted(p.name for p in out_dir.iterdir() if p.name not in keep)
    assert left == [], left


def save_model(model, tmp_path, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


# A CLI process that calibrates slowly and says when it is under way (for signal tests).
SLOW_CLI = textwrap.dedent("""
    import sys, time
    import quantizer.dataset as dataset
    original = dataset.DataSource.stream_named

    def slow(source, specs):
        for index, named in enumerate(original(source, specs)):
            if index == 1:
                print("CALIBRATING", file=sys.stderr, flush=True)
            time.sleep(0.05)
            yield named

    dataset.DataSource.stream_named = slow
    from quantizer.cli.main import main
    sys.argv = ["quantize", *sys.argv[1:]]
    main()
""")
