"""The `quantize` group and the guard every command runs under.

Every failure we can explain is one line on stderr (``error: ...``) and a documented exit
code; a traceback (with the original cause) only with --debug.  SIGTERM ends a run like
Ctrl-C: nothing half-written is left, temporary files are removed, exit 130.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import warnings
from pathlib import Path

import click

from quantizer.errors import QuantizerError, first_line

from .text import for_cli, one_line

EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class QuantizeGroup(click.Group):
    """`quantize MODEL ...` means `quantize run MODEL ...`; `run` is not listed.

    A first word that is not a command and not a model path is a mistyped command: it gets
    the nearest command name instead of a "file not found" from `run`.  `quantize help
    [COMMAND]` is `--help`."""

    def parse_args(self, ctx, args):
        if args and args[0] == "help":
            args = [*args[1:2], "--help"] if len(args) > 1 and args[1] in self.commands else ["--help"]
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            first = args[0]
            if not _looks_like_a_model(first):
                import difflib

                close = difflib.get_close_matches(first, [c for c in self.commands if c != "run"], n=1, cutoff=0.6)
                if close:
                    raise click.UsageError(f"unknown command '{first}' (did you mean '{close[0]}'?); "
                                           f"commands: {', '.join(c for c in sorted(self.commands) if c != 'run')}")
            args = ["run", *args]
        elif args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@contextlib.contextmanager
def _quiet_libraries(quiet: bool):
    if not quiet:
        yield
        return
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds exactly like Ctrl-C: staged files are removed


@contextlib.contextmanager
def _sigterm_as_interrupt():
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. an embedding application): leave it
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _looks_like_a_model(word: str) -> bool:
    """A path (existing, or with a separator or a file suffix) rather than a command name."""
    return Path(word).exists() or "/" in word or "\\" in word or "." in word


def error(message: str, code: int):
    click.echo(one_line(f"error: {for_cli(message)}"), err=True)
    sys.exit(code)


def run_guarded(debug: bool, action) -> None:
    """Run ``action``; map failures to one line and an exit code.  Without --debug, library
    log records and Python warnings (onnx-ir, numpy) are silenced: stderr is ours."""
    try:
        with _sigterm_as_interrupt(), _quiet_libraries(not debug):
            action()
    except QuantizerError as exc:
        if debug:
            raise
        error(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: no output written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # a bug of ours: still one line unless --debug
        if debug:
            raise
        click.echo(one_line(f"internal error: {type(exc).__name__}: {first_line(exc)} "
                            "(rerun with --debug for details)"), err=True)
        sys.exit(EXIT_INTERNAL)


def default_output(model: str, suffix: str) -> Path:
    path = Path(model)
    return path.with_name(f"{path.stem}_{suffix}.onnx")


@click.group(cls=QuantizeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnx-int8-quantizer")
def cli():
    """ONNX int8 quantizer.  `quantize MODEL --data DIR` runs all stages.

    \b
    Examples, one per command:
      quantize model.onnx --data calib/ [--calib entropy_sym] [--target tensorrt] [--strict]
      quantize inspect model.onnx --exclude 'head/*'         # what would be quantized, no data
      quantize compare model.onnx model_int8.onnx --data heldout/ --min-sqnr 20
      quantize tune model.onnx --data calib/ --eval evaluate.py
      quantize targets [tensorrt]                            # the backends and what they declare
      quantize optimize model.onnx -o model_opt.onnx         # the stage-1 float model only
      quantize edit model_int8.onnx --input-type x=uint8     # integer inputs/outputs (NPUs)
      quantize run --help                                    # every option of a plain run
    \b
    Shell completion (bash): eval "$(_QUANTIZE_COMPLETE=bash_source quantize)"
    """


def main(argv=None) -> None:
    """Entry point: click's own usage errors become one `error:` line and exit 2 too."""
    try:
        cli.main(args=argv, prog_name="quantize", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("interrupted: no output written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        hint = f" (see 'quantize {exc.ctx.info_name} --help')" if exc.ctx is not None and exc.ctx.info_name != "quantize" else " (see 'quantize --help')"
        click.echo(one_line(f"error: {exc.format_message()}{hint}"), err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(one_line(f"error: {exc.format_message()}"), err=True)
        sys.exit(exc.exit_code)
