"""xllm-compile: a graph compiler and runtime for large-language-model inference on PyTorch."""

__version__ = "0.1.0"
