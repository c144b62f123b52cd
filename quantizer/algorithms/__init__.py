"""Accuracy steps between calibration and Q/DQ insertion, each with one job:

- ``normalization``: find normalization arithmetic (mean, variance, reciprocal square
  root) and keep it float, whatever op table the target has.
- ``loss_aware``: choose each tensor's range among candidates by the error of the block
  that consumes it (the ``auto`` calibration method).
- ``bias_correction``: fold the output shift that weight rounding causes into the bias.
- ``equalization``: cross-layer equalization of layer pairs and high-bias absorption
  (stage 1, before calibration; exact in float).
- ``smooth_quant``: move per-channel outliers of MatMul/Gemm inputs into the weight rows
  (SmoothQuant), folded into the op that produces the input; before calibration.
"""
