"""`quantize targets [NAME|FILE]`: the presets and what each declares."""

from __future__ import annotations

import json

import click

from quantizer.errors import UsageError
from quantizer.targets import PRESETS, TargetError, load_target, machine_preset

from .. import options
from ..app import cli, run_guarded
from ..text import format_target


@cli.command("targets")
@click.argument("target", required=False, metavar="[NAME|FILE]")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved declaration(s) as JSON.")
@options.debug
def targets(target, as_json, debug):
    """List the targets (presets) and what they declare; with NAME or FILE, show that one
    in full (a user file resolved on top of its base)."""

    def action():
        try:
            chosen = [load_target(target)] if target else [load_target(name) for name in PRESETS]
        except TargetError as exc:
            raise UsageError(f"`target`: {exc}") from exc
        if as_json:
            data = [t.as_dict() for t in chosen]
            click.echo(json.dumps(data[0] if target else data, indent=2, sort_keys=True))
            return
        if not target:
            click.echo(f"default: ort-cpu (on this machine: {machine_preset()}); npu is an alias of tflite\n")
        for i, t in enumerate(chosen):
            if i:
                click.echo("")
            click.echo(format_target(t, full=bool(target)))

    run_guarded(debug, action)
