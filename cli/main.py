"""The `quantize` command line: the group (app.py), shared options (options.py), one
module per command (commands/), all terminal text (text.py).

    quantize MODEL --calib min_max_asym --data ./calib -o model_int8.onnx
    quantize optimize MODEL -o model_opt.onnx
    quantize edit model_int8.onnx --input-type x=uint8 --output-type y=int8 -o model_npu.onnx
    quantize tune MODEL --data ./calib --eval evaluate.py
"""

from __future__ import annotations

from .app import cli, main
from .commands import calibrate, compare, edit, inspect, optimize, run, targets, tune  # noqa: F401  (registers the commands)

__all__ = ["cli", "main"]

if __name__ == "__main__":
    main()
