"""Every config.json field of the supported families is implemented (with a parity test) or
refused with one line naming it: none is silently ignored."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch

from xllm_compile.config_fields import INERT, READ
from xllm_compile.errors import UnsupportedModelError
from xllm_compile.models import model_config_from_hf
from xllm_compile.runtime import load

from conftest import BASE, compile_cli
from helpers import hf_greedy, hf_logits, prefill_then_decode, rel_err

CLASSES = ["LlamaConfig", "Qwen2Config", "Qwen3Config", "MistralConfig"]
PROMPT = [1, 17, 93, 250, 4, 61, 77, 300, 12, 45]


@pytest.mark.parametrize("name", CLASSES)
def test_every_field_of_the_config_class_is_read_or_inert(name):
    import transformers

    cls = getattr(transformers, name)
    fields = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters)
    fields -= {"self", "kwargs"}
    unclassified = sorted(fields - READ - set(INERT))
    assert not unclassified, f"{name}: decide READ or INERT (config_fields.py): {unclassified}"


def llama_config(**extra) -> dict:
    from transformers import LlamaConfig

    return {**LlamaConfig(**BASE).to_dict(), "architectures": ["LlamaForCausalLM"], **extra}


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quant_method='gptq'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 8,
                "max_window_layers": 1,
            },
            "max_window_layers=1",
        ),
    ],
)
def test_values_we_cannot_honour_are_refused(extra, needle):
    with pytest.raises(UnsupportedModelError, match=needle.replace("(", r"\(")):
        model_config_from_hf(llama_config(**extra))


def test_refusal_through_the_cli_is_one_line(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**BASE)).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "hidden_act": "mish"}))
    cmd = [
        sys.executable,
        "-m",
        "xllm_compile",
        "compile",
        str(tmp_path / "hf"),
        "--out",
        str(tmp_path / "art"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "hidden_act='mish'" in proc.stderr


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_new", "relu"])
def test_other_activations_match_transformers(act, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE, hidden_act=act)).eval()
    model.save_pretrained(tmp_path / "hf")
    engine = load(compile_cli(tmp_path / "hf", tmp_path / "art"))
    ref = hf_greedy(model, PROMPT, 6)
    assert rel_err(prefill_then_decode(engine, PROMPT, ref), hf_logits(model, PROMPT + ref)) < 1e-4
    assert engine.generate([PROMPT], max_tokens=6, ignore_eos=True)[0].token_ids == ref
