"""The one error class of the calibrators package.

The calibrators are pure numpy and know nothing of the quantizer; the quantizer turns a
CalibratorError into its own error class (and exit code) where it calls in.
"""


class CalibratorError(ValueError):
    """A bad method name or option, or statistics that cannot serve the method."""
