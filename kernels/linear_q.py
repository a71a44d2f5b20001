"""`xllm::linear_q`: `x @ dequant(qweight).T + bias` over weights kept as ggml's quantized blocks.

    qweight  uint8 [N, row_bytes]   row n = the blocks of weight row n, in order along K
    qtype    "q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k"

The numbers are ggml's blocks (a GGUF file's bytes; fp16 numbers little-endian):

    q8_0  32 values, 34 B: d fp16, q int8[32]                  w = q * d
    q4_0  32 values, 18 B: d fp16, q 4-bit[32]                 w = (q - 8) * d
    q4_1  32 values, 20 B: d fp16, m fp16, q 4-bit[32]         w = q * d + m
          (4-bit: byte j holds value j in its low nibble, value j + 16 in its high one)
    q4_k  256 values, 144 B: d fp16, dmin fp16, 12 B of 6-bit scale/min pairs for 8
          sub-blocks of 32, q 4-bit[256]                        w = d * sc * q - dmin * mn
    q6_k  256 values, 210 B: ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16] (one per 16
          values), d fp16                                       w = d * sc * (q - 32)

Row layout. q4_k and q6_k rows are their blocks one after the other, as in the GGUF. q8_0, q4_0
and q4_1 rows hold the same bytes regrouped (`regroup` / `ungroup`, lossless): the row's nb
block scales d (fp16), then its nb mins m (q4_1 only), then the blocks' values (32 bytes q8_0,
16 bytes 4-bit) in groups of 16 blocks interleaved 4 bytes at a time: byte 64 c + 4 i + k of a
group is byte 4 c + k of its block i (i < 16, k < 4; c < 8 for q8_0, c < 4 for 4-bit), so each
4-byte lane of a 64-byte load belongs to one block and a kernel sums a block's dot product in
one int32 lane (kernels/cpu/xllm_linear_q.cpp). The last nb % 16 blocks follow in block order.
The kernel then converts 16 scales with one instruction and streams the values without stepping
over 2-4 scale bytes every 16-32 bytes.

`dequantize` is the reference (torch, the arithmetic of ggml's dequantize_row_* and of
transformers' GGUF loader); `quantize` writes q8_0 / q4_0 / q4_1 rows from a float weight the
way ggml's quantize_row_*_ref does (tests compare with the gguf package bit for bit).

CPU kernel: kernels/cpu/xllm_linear_q.cpp (fp32 activations, weights decoded in registers/L1
once per step for up to 16 rows; ATen on a decoded buffer beyond). Elsewhere the reference runs
(dequantize-then-matmul): `xllm-compile --quant` is refused for devices without a kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm_compile.kernels.cpu import dispatch_or_fallback

# qtype -> (values per block, bytes per block)
FORMATS = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
}
# the GGUF storage type names (gguf.GGMLQuantizationType) of the same layouts
GGUF_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q4_K": "q4_k", "Q6_K": "q6_k"}

_SCHEMA = "(Tensor x, Tensor qweight, str qtype, Tensor? bias=None) -> Tensor"
_OUT_SCHEMA = (
    "(Tensor x, Tensor qweight, str qtype, Tensor? bias=None, *, Tensor(a!) out) -> Tensor(a!)"
)

torch.library.define("xllm::linear_q", _SCHEMA)
torch.library.define("xllm::linear_q.out", _OUT_SCHEMA)


def in_features(qweight: torch.Tensor, qtype: str) -> int:
    block, nbytes = FORMATS[qtype]
    return qweight.shape[1] // nbytes * block


def row_bytes(k: int, qtype: str) -> int:
    block, nbytes = FORMATS[qtype]
    return k // block * nbytes


def _scale_bytes(qtype: str) -> int:
    """Leading bytes of a 32-value block that are scales (d; d and m for q4_1)."""
    return 4 if qtype == "q4_1" else 2


GROUP = 16  # blocks a group of interleaved values holds


def _interleave(values: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Block values [N, nb, vb] in block order <-> the kernel's order (see above), flattened."""
    n, nb, vb = values.shape
    full = nb // GROUP * GROUP
    head = values[:, :full].reshape(n, nb // GROUP, GROUP, vb // 4, 4)  # [n, g, block i, c, k]
    if inverse:  # the stored bytes read as [n, g, c, i, k]
        head = head.reshape(n, nb // GROUP, vb // 4, GROUP, 4)
    head = head.transpose(2, 3).reshape(n, -1)
    return torch.cat([head, values[:, full:].reshape(n, -1)], 1)


def regroup(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """ggml blocks [N, nb * bytes] (a GGUF's rows) -> this op's row layout (see above)."""
    if FORMATS[qtype][0] != 32:
        return blocks.contiguous()
    n, nbytes, head = blocks.shape[0], FORMATS[qtype][1], _scale_bytes(qtype)
    b = blocks.reshape(n, -1, nbytes)
    scales = b[..., :head].reshape(n, -1, head // 2, 2).transpose(1, 2).reshape(n, -1)
    return torch.cat([scales, _interleave(b[..., head:])], 1).contiguous()


def ungroup(qweight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The inverse of `regroup`: ggml's blocks, as a GGUF stores them."""
    if FORMATS[qtype][0] != 32:
        return qweight.contiguous()
    n, nbytes, head = qweight.shape[0], FORMATS[qtype][1], _scale_bytes(qtype)
    nb = qweight.shape[1] // nbytes
    scales = qweight[:, : nb * head].reshape(n, head // 2, nb, 2).transpose(1, 2)
    values = qweight[:, nb * head :].reshape(n, nb, nbytes - head)
    values = _interleave(values, inverse=True).reshape(n, nb, nbytes - head)
    return torch.cat([scales.reshape(n, nb, head), values], -1).reshape(n, -1).contiguous()


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 (little-endian fp16) -> [..., 1] fp32."""
    return b.contiguous().view(torch.float16).float()


def dequantize(qweight: torch.Tensor, qtype: str) -> torch.Tensor:
    """The fp32 weight [N, K] that `qweight`'s rows (this op's layout) stand for."""
    return dequantize_ggml(ungroup(qweight, qtype), qtype)


def dequantize_ggml(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """The fp32 weight [N, K] of ggml blocks [N, nb * bytes]."""
    nbytes = FORMATS[qtype][1]
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, nbytes)
    if qtype == "q8_0":
        w = _f16(b[..., :2]) * b[..., 2:].contiguous().view(torch.int8).float()
    elif qtype in ("q4_0", "q4_1"):
        q = b[..., 4:] if qtype == "q4_1" else b[..., 2:]
        q = torch.cat([q & 0xF, q >> 4], -1).float()
        d = _f16(b[..., :2])
        w = (q - 8) * d if qtype == "q4_0" else q * d + _f16(b[..., 2:4])
    elif qtype == "q4_k":
        w = _q4_k(b)
    else:
        w = _q6_k(b)
    return w.reshape(n, -1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    s = b[..., 4:16].int()
    lo_sc, lo_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    hi_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = torch.cat([lo_sc, hi_sc], -1).float()  # [.., 8]
    mn = torch.cat([lo_m, hi_m], -1).float()
    q = b[..., 16:].reshape(*b.shape[:-1], 4, 32)  # 4 chunks of 32 bytes = sub-blocks 2j, 2j+1
    q = torch.stack([q & 0xF, q >> 4], -2).reshape(*b.shape[:-1], 8, 32).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(*b.shape[:-1], 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[..., :128].reshape(*b.shape[:-1], 2, 64).int()
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 1, 32).int()
    sc = b[..., 192:208].contiguous().view(torch.int8).float().reshape(*b.shape[:-1], 2, 8)
    d = _f16(b[..., 208:210])[..., None]  # [.., 1, 1]
    a, b2 = ql[..., :32], ql[..., 32:]
    lo = torch.cat([a & 0xF, b2 & 0xF, a >> 4, b2 >> 4], -1)
    hi = ((qh >> torch.tensor([0, 2, 4, 6]).reshape(4, 1)) & 3).reshape(*b.shape[:-1], 2, 128)
    q = ((lo | (hi << 4)) - 32).float()  # [.., 2, 128]
    scale = (d * sc).repeat_interleave(16, -1)  # [.., 2, 128]
    return (scale * q).reshape(*b.shape[:-1], 256)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml rounds."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[.., 32] values 0-15 -> [.., 16] bytes: value j low nibble, value j + 16 high."""
    return q[..., :16] | (q[..., 16:] << 4)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8)


def quantize(w: torch.Tensor, qtype: str, search: bool = False) -> torch.Tensor:
    """This op's q8_0 / q4_0 / q4_1 rows [N, row_bytes] of a float weight [N, K] (K a multiple
    of 32): `regroup` of the blocks ggml's reference quantizers write (`quantize_ggml`)."""
    return regroup(quantize_ggml(w, qtype, search), qtype)


def quantize_ggml(w: torch.Tensor, qtype: str, search: bool = False) -> torch.Tensor:
    """q8_0 / q4_0 / q4_1 ggml blocks [N, nb * bytes] of a float weight [N, K],
    as ggml's reference quantizers write them. `search` (q4_1 only): choose each block's scale
    and min among a few candidates by squared error instead of plain min/max (`--quant int4`)."""
    n, k = w.shape
    x = w.detach().float().reshape(n, k // 32, 32)
    if qtype == "q8_0":
        d = x.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, 0, 1 / torch.where(d == 0, 1, d))
        q = _round_away(x * inv).to(torch.int8).view(torch.uint8)
        out = torch.cat([_f16_bytes(d), q], -1)
    elif qtype == "q4_0":
        idx = x.abs().argmax(-1, keepdim=True)
        d = torch.gather(x, -1, idx) / -8
        inv = torch.where(d == 0, 0, 1 / torch.where(d == 0, 1, d))
        q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), _pack_nibbles(q)], -1)
    elif qtype == "q4_1":
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if search:
            lo, hi = _search_q4_1(x, lo, hi)
        d = (hi - lo) / 15
        inv = torch.where(d == 0, 0, 1 / torch.where(d == 0, 1, d))
        q = torch.trunc((x - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)
        out = torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], -1)
    else:
        raise ValueError(f"no quantizer for {qtype}")
    return out.reshape(n, -1).contiguous()


def _search_q4_1(x, lo, hi, steps: int = 16):
    """Per block, the (min, max) among shrunken ranges with the least squared error once
    rounded to 4 bits and fp16 (the error the artifact really has)."""
    best_lo, best_hi = lo.clone(), hi.clone()
    best = torch.full_like(lo, float("inf"))
    for i in range(steps):
        f = 1.0 - 0.02 * i  # shrink the range by up to 30%, around its centre
        mid, half = (hi + lo) / 2, (hi - lo) / 2 * f
        c_lo, c_hi = mid - half, mid + half
        d = ((c_hi - c_lo) / 15).to(torch.float16).float()
        m = c_lo.to(torch.float16).float()
        inv = torch.where(d == 0, 0, 1 / torch.where(d == 0, 1, d))
        q = torch.trunc((x - m) * inv + 0.5).clamp(0, 15)
        err = ((q * d + m - x) ** 2).sum(-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def linear_q_ref(x, qweight, qtype, bias=None):
    w = dequantize(qweight, qtype)
    b = None if bias is None else bias.float()
    return F.linear(x.float(), w, b).to(x.dtype)


def linear_q_out_ref(x, qweight, qtype, bias=None, *, out):
    y = linear_q_ref(x, qweight, qtype, bias)
    out.resize_(y.shape)
    return out.copy_(y)


torch.library.impl("xllm::linear_q", "default", linear_q_ref)
torch.library.impl("xllm::linear_q.out", "default", linear_q_out_ref)


@torch.library.register_fake("xllm::linear_q")
def _(x, qweight, qtype, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("xllm::linear_q.out")
def _(x, qweight, qtype, bias=None, *, out):
    return out


@torch.library.impl("xllm::linear_q", "cpu")
def _(x, qweight, qtype, bias=None):
    return dispatch_or_fallback("linear_q", linear_q_ref, x, qweight, qtype, bias)


@torch.library.impl("xllm::linear_q.out", "cpu")
def _(x, qweight, qtype, bias=None, *, out):
    import xllm_compile.kernels.cpu as cpu

    if cpu.ensure_loaded() is None:
        return torch.ops.xllm.linear_q.out(x, qweight, qtype, bias, out=out)
    return linear_q_out_ref(x, qweight, qtype, bias, out=out)


linear_q = torch.ops.xllm.linear_q.default
