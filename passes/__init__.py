"""Graph passes over the exported torch.fx graph and the pass manager (see README.md)."""

from xllm_compile.passes.base import Pass, PassContext, PassStats
from xllm_compile.passes.manager import PassManager, run_graph
from xllm_compile.passes.pipeline import PIPELINE, build_pipeline, parse_pass_list, pass_names

__all__ = [
    "PIPELINE",
    "Pass",
    "PassContext",
    "PassManager",
    "PassStats",
    "build_pipeline",
    "parse_pass_list",
    "pass_names",
    "run_graph",
]
