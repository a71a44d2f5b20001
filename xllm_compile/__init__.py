"""xllm-compile: a graph compiler and runtime for large-language-model inference on PyTorch."""

import os as _os

__version__ = "0.1.0"

# kernels/, passes/, runtime/ and tools/ sit at the top of the source tree and are installed as
# xllm_compile.* subpackages (pyproject package-dir). Run from a checkout whose editable install
# cannot map them (older setuptools, no install at all), add the tree's root to this package's
# path so `xllm_compile.runtime` still resolves to ./runtime.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isdir(
    _os.path.join(_root, "runtime")
):
    __path__.append(_root)  # noqa: F821 (module __path__)
