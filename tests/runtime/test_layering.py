"""DESIGN's import table, checked on a real serving process: loading and running an artifact
imports none of the compiler's side (model code, HF config parsing, passes, the TP compile
stage) and not transformers; and in the sources: passes/ imports neither the runtime nor the
artifact's plan format."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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
    "xllm_compile.overlap",
    "xllm_compile.comm_profile",
    "xllm_compile.onnx_export",
    "xllm_compile.onnx_functions",
    "onnx",
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


def test_passes_import_neither_the_runtime_nor_the_plan_format():
    root = Path(__file__).resolve().parents[2] / "passes"
    banned = ("xllm_compile.runtime", "xllm_compile.arena_plans", "xllm_compile.models")
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(banned)]
            assert not bad, f"{path.name} imports {bad[0]}"
