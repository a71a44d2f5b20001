"""The serving runtime: loads an artifact and runs it. Never imports the model code, the passes or
transformers: the artifact is the deployable unit."""

from xllm_compile.runtime.engine import Completion, Engine
from xllm_compile.runtime.loader import load
from xllm_compile.runtime.sampler import SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams", "load"]
