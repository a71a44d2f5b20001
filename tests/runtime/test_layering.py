"""DESIGN's import table, checked on a real serving process: loading and running an artifact
imports none of the compiler's side (model code, HF config parsing, passes, the TP compile
stage) and not transformers."""

from __future__ import annotations

import json
import subprocess
import sys

COMPILER_SIDE = [
    "transformers",
    "xllm_compile.models",
    "xllm_compile.hf_config",
    "xllm_compile.config_fields",
    "xllm_compile.hf",
    "xllm_compile.passes",
    "xllm_compile.tp",
    "xllm_compile.compiler",
    "xllm_compile.trace",
]


def test_serving_imports_nothing_of_the_compiler(llama_artifact):
    script = (
        "import json, sys; from xllm_compile.runtime import load; "
        f"load({str(llama_artifact)!r}).generate([[1, 2, 3]], max_tokens=2); "
        f"print(json.dumps([m for m in {COMPILER_SIDE!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []
