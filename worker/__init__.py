"""GPU inference worker node: supervised engines behind an OpenAI-compatible gateway."""

__version__ = "0.1.0"
