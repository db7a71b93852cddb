"""An OpenAI-compatible gateway that runs as a sidecar in front of vLLM."""

__version__ = "0.1.0"
