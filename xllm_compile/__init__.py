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

# The same root on sys.path (`python -m pytest` or `python -m xllm_compile...` run from it) would
# make ./kernels the top-level `kernels` module too, shadowing Hugging Face's `kernels` package,
# which transformers (5.x) imports when it is installed (its dependency): every model import then
# fails (ImportError: cannot import name 'CUDAProperties' from 'kernels'). Nothing is imported
# from the root as a top-level module, so it comes off sys.path.
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "registry.py")
):
    import sys as _sys

    _sys.path[:] = [
        p for p in _sys.path if _os.path.realpath(p or _os.curdir) != _os.path.realpath(_root)
    ]
    if getattr(_sys.modules.get("kernels"), "__file__", None) == _os.path.join(
        _root, "kernels", "__init__.py"
    ):
        del _sys.modules["kernels"]  # imported as `kernels` before this ran: forget it
