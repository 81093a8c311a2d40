"""rtexport: Router-Tuning for pretrained LLMs, and the artifacts people deploy from it."""

__version__ = "0.1.0"
