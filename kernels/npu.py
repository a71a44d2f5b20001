"""Ascend NPU bindings of the `xllm::` ops: each maps the op's contract onto its torch_npu
counterpart (shapes, layouts, argument names, which outputs to keep):

    rms_norm             torch_npu.npu_rms_norm(x, gamma, epsilon) -> (y, rstd)
    fused_add_rms_norm   torch_npu.npu_add_rms_norm(x1, x2, gamma, epsilon) -> (y, rstd, x1 + x2)
    silu_and_mul         torch_npu.npu_swiglu(cat(gate, up), dim=-1)  (halves of one matmul:
                         read in place)
    rotary_embedding     torch_npu.npu_rotary_mul(x, cos, sin) on [1, T, heads, D] (rotate-half,
                         full-width tables; the rest take the reference)
    store_kv             torch_npu.npu_scatter_nd_update_(cache[layer, k|v], [slot, pos], rows)
    attention            torch_npu.npu_fused_infer_attention_score per sequence, BSH layout,
                         GQA through num_key_value_heads, a causal boolean mask over its cached
                         context for prefill (no window: a sliding window takes the reference)

Importable anywhere: torch_npu is imported on first use. `register()` puts them on the npu
dispatch key (PrivateUse1, which torch_npu names) and is called when a model runs on npu. None
of this has run on an NPU (none is reachable from this project's machines): the tests check the
argument mapping with torch_npu replaced at the module boundary by a stand-in that computes
each operator's documented formula (tests/kernels/test_npu_bindings.py).
"""

from __future__ import annotations

import functools
import importlib

import torch


def unavailable() -> str | None:
    """None when torch_npu imports here, else why not."""
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # ImportError, or a broken CANN install failing at import
        return f"torch_npu is not importable ({type(e).__name__}); pip install 'xllm-compile[npu]'"
    return None


def _npu():
    return importlib.import_module("torch_npu")


def rms_norm(x, weight, eps):
    y, _rstd = _npu().npu_rms_norm(x, weight, epsilon=eps)
    return y


def fused_add_rms_norm(x, residual, weight, eps):
    y, _rstd, summed = _npu().npu_add_rms_norm(x, residual, weight, epsilon=eps)
    return y, summed


def _joined(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[.., 2F]: the merged gate_up matmul's output when gate and up are its two halves (a
    view, no copy), else their concatenation."""
    n = gate.shape[-1]
    adjacent = (
        gate.shape == up.shape
        and gate.stride() == up.stride()
        and gate.stride(-1) == 1
        and up.data_ptr() == gate.data_ptr() + n * gate.element_size()
        and gate.dtype == up.dtype
    )
    if adjacent:
        shape = (*gate.shape[:-1], 2 * n)
        return gate.as_strided(shape, gate.stride(), gate.storage_offset())
    return torch.cat((gate, up), dim=-1)


def silu_and_mul(gate, up):
    return _npu().npu_swiglu(_joined(gate, up), dim=-1)


def rotary_embedding(q, k, cos, sin, is_neox=True):
    npu = _npu()
    c, s = cos.unsqueeze(0), sin.unsqueeze(0)  # [1, T, 1, D]
    return (
        npu.npu_rotary_mul(q.unsqueeze(0), c, s).squeeze(0),
        npu.npu_rotary_mul(k.unsqueeze(0), c, s).squeeze(0),
    )


def store_kv(kv_cache, layer, k, v, token_slots, positions) -> None:
    npu = _npu()
    index = torch.stack((token_slots, positions), dim=-1)  # [T, 2] into [S, M, Hkv, D]
    npu.npu_scatter_nd_update_(kv_cache[layer, 0], index, k.to(kv_cache.dtype))
    npu.npu_scatter_nd_update_(kv_cache[layer, 1], index, v.to(kv_cache.dtype))


def attention(q, kv_cache, layer, positions, seq_slots, query_lens, seq_lens, scale, window):
    npu = _npu()
    _, heads, dim = q.shape
    kv_heads = kv_cache.shape[4]
    out = torch.empty_like(q)
    start = 0
    for slot, q_len, kv_len in zip(
        seq_slots.tolist(), query_lens.tolist(), seq_lens.tolist(), strict=True
    ):
        end = start + q_len
        k = kv_cache[layer, 0, slot, :kv_len].reshape(1, kv_len, kv_heads * dim)
        v = kv_cache[layer, 1, slot, :kv_len].reshape(1, kv_len, kv_heads * dim)
        query = q[start:end].reshape(1, q_len, heads * dim)
        mask = None
        if q_len > 1:  # query i sits at kv_len - q_len + i: it must not see the keys after it
            rows = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            mask = (torch.arange(kv_len, device=q.device)[None, :] > rows)[None, None]
        o, _lse = npu.npu_fused_infer_attention_score(
            query,
            k.contiguous(),
            v.contiguous(),
            atten_mask=mask,
            num_heads=heads,
            num_key_value_heads=kv_heads,
            scale_value=scale,
            input_layout="BSH",
        )
        out[start:end] = o.reshape(q_len, heads, dim)
        start = end
    return out


@functools.cache
def register() -> None:
    """Register every op's npu kernel (through the registry, so a refused operand falls back to
    the reference). Needs torch_npu imported (it names the PrivateUse1 key "npu")."""
    from xllm_compile.kernels import registry
    from xllm_compile.kernels.cuda.bindings import OPS  # the same ops, on the npu key

    _npu()
    registry.register("npu", OPS)
