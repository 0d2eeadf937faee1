"""The one error type of GGUF export: bad input, raised before anything is written."""


class ExportError(ValueError):
    """An export that cannot be done as asked: what was wrong and what is accepted."""
