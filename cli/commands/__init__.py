"""One module per `quantize` command."""
