// xllm::linear_q: y = x @ dequant(W)^T (+ b) over weights stored as ggml's quantized blocks
// (kernels/linear_q.py documents the five formats and the row layout). A decode step is little
// else than streaming these bytes, so for the few rows of a step (<= kMaxRows) each weight row is
// read once, while every activation row is multiplied with it. Rows are split over ATen's threads
// in runs of consecutive rows (one forward stream per thread, kPrefetchBytes prefetched ahead).
//
// Paths, by at::get_cpu_capability() (ATEN_CPU_CAPABILITY=avx2|default forces the lower ones):
//   AVX512-VNNI, q8_0 / q4_0 / q4_1: integer dot products (vpdpbusd, 64 weights a time) on
//     activations quantized once a call to three int8 planes a block of 32 (~24 bits: the
//     reference's numbers to ~1e-6 relative; ggml's one int8 plane moves logits ~1e-3, two planes
//     flipped a greedy token of SmolLM2). XLLM_QUANT_ACTIVATIONS=fp32 turns it off.
//   AVX512, q8_0 / q4_0 / q4_1: each block decoded in registers (16 scales converted at once)
//     and multiplied in fp32: d * (x . q) plus the offsets per row.
//   AVX2, q4_0 / q4_1: the same integer sums on the same activation planes, by vpmaddubsw on
//     256-bit registers; q8_0: two 16-bit activation digits a value (~30 bits), by vpmaddwd.
//     XLLM_QUANT_ACTIVATIONS=fp32 turns them off too.
//   AVX2+FMA otherwise, and the K-quants everywhere: a row decoded into fp32 in L1, then an fp32
//     dot.
//   plain C++ elsewhere.
// A row's result never depends on the other rows of the call (same instructions per row), so
// padding a batch to its bucket cannot move real rows' logits. More rows (prefill): each thread
// decodes its own weight rows to fp32 and runs a one-thread GEMM on them.
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "xllm_avx512.h"
#include "xllm_pool.h"
#include "xllm_ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define XLLM_X86 1
#endif

namespace {

constexpr int64_t kMaxRows = 16;  // activation rows on the streaming kernel; ATen beyond
constexpr int64_t kGrainBytes = 32 << 10;  // packed weight bytes per parallel task
// Zeros after the per-block arrays the kernels read with masked 16-lane loads (the activation
// rows' block sums and scales): a masked load whose off lanes run past the buffer's end is slow
// (measured: gate_up at K = 576, 18 blocks, 2.5x slower than with the padding).
constexpr int64_t kMaskPad = 16;
// (XLLM_PREFETCH_BYTES overrides it, for tuning on another machine)
const int64_t kPrefetchBytes = [] {
  const char* v = std::getenv("XLLM_PREFETCH_BYTES");
  return v ? std::atoll(v) : int64_t{4096};
}();

enum class QType { Q8_0, Q4_0, Q4_1, Q4_K, Q6_K };

struct Format {
  QType type;
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};

Format format_of(std::string_view name) {
  if (name == "q8_0") return {QType::Q8_0, 32, 34};
  if (name == "q4_0") return {QType::Q4_0, 32, 18};
  if (name == "q4_1") return {QType::Q4_1, 32, 20};
  if (name == "q4_k") return {QType::Q4_K, 256, 144};
  if (name == "q6_k") return {QType::Q6_K, 256, 210};
  TORCH_CHECK(false, "xllm::linear_q: unknown qtype '", std::string(name), "'");
}

inline float half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// ---- plain C++ decoders: one row of K values -> fp32 (the reference's arithmetic) ----------

// q8_0 / q4_0 / q4_1 rows are regrouped (kernels/linear_q.py): the row's nb block scales d
// (fp16), then its nb mins m (q4_1), then the blocks' values (32 or 16 bytes each).
struct Row32 {
  const uint8_t* d;   // nb fp16
  const uint8_t* m;   // nb fp16 (q4_1), else null
  const uint8_t* qs;  // the blocks' values: nb * 32 bytes (q8_0), nb * 16 (4-bit, grouped)
  int64_t nb;
};

inline Row32 row32(QType t, const uint8_t* row, int64_t K) {
  const int64_t nb = K / 32;
  const uint8_t* m = t == QType::Q4_1 ? row + 2 * nb : nullptr;
  return {row, m, row + (t == QType::Q4_1 ? 4 : 2) * nb, nb};
}

// A row's values come in groups of kGroup blocks interleaved 4 bytes at a time (byte 64 c + 4 i + k
// of a group is byte 4 c + k of its block i), the last nb % kGroup blocks in block order.
constexpr int64_t kGroup = 16;

inline int64_t value_bytes(QType t) { return t == QType::Q8_0 ? 32 : 16; }

// Where block b's values start, and the step from one of its 4-byte pieces to the next.
struct Values {
  const uint8_t* at;
  int64_t step;
};

inline Values values_of(QType t, const Row32& r, int64_t b) {
  const int64_t vb = value_bytes(t);
  if (b >= r.nb / kGroup * kGroup) return {r.qs + vb * b, 4};
  return {r.qs + vb * kGroup * (b / kGroup) + 4 * (b % kGroup), 64};
}

// Block b's value bytes in ggml's order (gathered into tmp when interleaved).
inline const uint8_t* block_values(QType t, const Row32& r, int64_t b, uint8_t* tmp) {
  const Values v = values_of(t, r, b);
  if (v.step == 4) return v.at;
  for (int64_t c = 0; c < value_bytes(t) / 4; ++c) std::memcpy(tmp + 4 * c, v.at + 64 * c, 4);
  return tmp;
}

void decode_row32_plain(QType t, const uint8_t* row, int64_t K, float* y) {
  const Row32 r = row32(t, row, K);
  uint8_t tmp[32];
  for (int64_t b = 0; b < r.nb; ++b, y += 32) {
    const float d = half(r.d + 2 * b);
    const uint8_t* q = block_values(t, r, b, tmp);
    if (t == QType::Q8_0) {
      const auto* s = reinterpret_cast<const int8_t*>(q);
      for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(s[i]) * d;
    } else if (t == QType::Q4_0) {
      for (int i = 0; i < 16; ++i) {
        y[i] = static_cast<float>((q[i] & 0xF) - 8) * d;
        y[i + 16] = static_cast<float>((q[i] >> 4) - 8) * d;
      }
    } else {
      const float m = half(r.m + 2 * b);
      for (int i = 0; i < 16; ++i) {
        y[i] = static_cast<float>(q[i] & 0xF) * d + m;
        y[i + 16] = static_cast<float>(q[i] >> 4) * d + m;
      }
    }
  }
}

inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void decode_q4_k(const uint8_t* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    uint8_t sc, m;
    scale_min_k4(is, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(is + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[j + l] = d1 * static_cast<float>(q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[j + 32 + l] = d2 * static_cast<float>(q[l] >> 4) - m2;
  }
}

void decode_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[n + l] = d * sc[is + 0] * static_cast<float>(q1);
      y[n + l + 32] = d * sc[is + 2] * static_cast<float>(q2);
      y[n + l + 64] = d * sc[is + 4] * static_cast<float>(q3);
      y[n + l + 96] = d * sc[is + 6] * static_cast<float>(q4);
    }
  }
}

void decode_row_plain(const Format& f, const uint8_t* row, int64_t K, float* y) {
  if (f.block == 32) return decode_row32_plain(f.type, row, K, y);
  for (int64_t k = 0; k < K; k += f.block, row += f.bytes)
    f.type == QType::Q4_K ? decode_q4_k(row, y + k) : decode_q6_k(row, y + k);
}

float dot_plain(const float* x, const float* w, int64_t K) {
  float s = 0.f;
  for (int64_t k = 0; k < K; ++k) s += x[k] * w[k];
  return s;
}

#ifdef XLLM_X86
#pragma GCC push_options
#pragma GCC target("avx2")
// Bytes 16 h .. 16 h + 15 of block b's values in a register: four 4-byte loads from an
// interleaved group (no stores to forward).
inline __m128i values_xmm(QType t, const Row32& r, int64_t b, int h = 0) {
  const Values v = values_of(t, r, b);
  const uint8_t* p = v.at + 4 * v.step * h;
  if (v.step == 4) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  int32_t c[4];
  for (int i = 0; i < 4; ++i) std::memcpy(c + i, p + 64 * i, 4);
  return _mm_setr_epi32(c[0], c[1], c[2], c[3]);
}

// s[i] = the sum of x[32 i .. 32 i + 31], for n blocks: ((x0-7 + x8-15) + (x16-23 + x24-31)) lane
// by lane, then the lanes. One order on every x86 path (AVX2 and AVX512 read the same sums).
// The scalar loop it replaces was one dependent add a value: 1-3 us a call at K = 576-1536, on
// the calling thread before the rows split (measured on a Zen 3).
void block_sums_256(const float* x, int64_t n, float* s) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xb = x + 32 * i;
    const __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),
                                   _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24)));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    s[i] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  }
}
#pragma GCC pop_options
#endif

// ---- AVX512 ----------------------------------------------------------------------------------
#ifdef XLLM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

inline float half_f16c(const uint8_t* p) {  // vcvtph2ps: c10::Half's conversion is ~20 ops
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}


// y[m] = x[m] . w for MB activation rows (each reduced alone: a row's sum never depends on
// which other rows share the call, so padding a batch cannot move real rows' logits). Four
// accumulators a row: one would chain every FMA on the last one's latency.
template <int MB>
inline void dot_rows_512(const float* x, int64_t ldx, const float* w, int64_t K, float* y) {
  __m512 acc[MB][4];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 wv = _mm512_loadu_ps(w + k + 16 * j);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[m][j] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k + 16 * j), wv, acc[m][j]);
    }
  for (; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + m * ldx + k), wv, acc[m][0]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    y[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                              _mm512_add_ps(acc[m][2], acc[m][3])));
}

// y[m] = x[m] . row for MB activation rows over a regrouped q8_0/q4_0/q4_1 row. Per block b:
// t = x[0:16] * q[0:16] + x[16:32] * q[16:32] (the values as integers, converted in registers),
// acc += d_b * t; the offsets come once per row, vectorized over blocks: q4_1 adds m_b * sum(x_b),
// q4_0 subtracts 8 d_b * sum(x_b) (`sums`: each activation row's block sums, [MB][nb]). The
// scales of 16 blocks are converted at once (one vcvtph2ps) and read back broadcast from memory
// by the FMAs. Two accumulators a row (even and odd blocks).
template <QType T, int MB>
inline void fused_rows_512(const uint8_t* row, int64_t K, const float* x, int64_t ldx,
                           const float* sums, int64_t lds, float* y) {
  const Row32 r = row32(T, row, K);
  __m512 acc[MB][2], off[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    acc[m][0] = acc[m][1] = off[m] = _mm512_setzero_ps();
  }
  alignas(64) float dbuf[16];
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  for (int64_t g = 0; g < r.nb; g += 16) {
    const int64_t n = std::min<int64_t>(16, r.nb - g);
    const __mmask16 mask = n == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
    const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.d + 2 * g));
    _mm512_store_ps(dbuf, dv);
    if constexpr (T != QType::Q8_0) {
      const __m512 ov = T == QType::Q4_1
                            ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.m + 2 * g))
                            : _mm512_mul_ps(dv, _mm512_set1_ps(-8.f));
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        off[m] = _mm512_fmadd_ps(ov, _mm512_maskz_loadu_ps(mask, sums + m * lds + g), off[m]);
    }
    auto block = [&](int64_t j, int slot) __attribute__((always_inline)) {
      const int64_t b = g + j;
      __m512 q0, q1;
      if constexpr (T == QType::Q8_0) {
        q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(values_xmm(T, r, b, 0)));
        q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(values_xmm(T, r, b, 1)));
      } else {
        const __m512i v = _mm512_cvtepu8_epi32(values_xmm(T, r, b));
        q0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, low4));
        q1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
      }
      const __m512 d = _mm512_set1_ps(dbuf[j]);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const float* xb = x + m * ldx + 32 * b;
        const __m512 t = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), q1,
                                         _mm512_mul_ps(_mm512_loadu_ps(xb), q0));
        acc[m][slot] = _mm512_fmadd_ps(t, d, acc[m][slot]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
      block(j, 0);
      block(j + 1, 1);
    }
    if (j < n) block(j, 0);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    y[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + _mm512_reduce_add_ps(off[m]);
}

template <QType T>
void fused_any_512(const uint8_t* row, int64_t K, const float* x, const float* sums, int64_t rows,
                   float* y) {
  const int64_t nb = K / 32;
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const float* xm = x + m0 * K;
    const float* sm = sums + m0 * nb;
    switch (std::min<int64_t>(rows - m0, 4)) {
      case 4: fused_rows_512<T, 4>(row, K, xm, K, sm, nb, y + m0); break;
      case 3: fused_rows_512<T, 3>(row, K, xm, K, sm, nb, y + m0); break;
      case 2: fused_rows_512<T, 2>(row, K, xm, K, sm, nb, y + m0); break;
      default: fused_rows_512<T, 1>(row, K, xm, K, sm, nb, y + m0); break;
    }
  }
}

// Whether the fused path takes format f; then y[0..rows) = x . row.
bool fused_512(const Format& f, const uint8_t* row, int64_t K, const float* x, const float* sums,
               int64_t rows, float* y) {
  switch (f.type) {
    case QType::Q8_0: fused_any_512<QType::Q8_0>(row, K, x, sums, rows, y); return true;
    case QType::Q4_0: fused_any_512<QType::Q4_0>(row, K, x, sums, rows, y); return true;
    case QType::Q4_1: fused_any_512<QType::Q4_1>(row, K, x, sums, rows, y); return true;
    default: return false;
  }
}

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,gfni,avx2,fma,f16c")

// ---- AVX512-VNNI: integer dot products on activations kept to ~24 bits ---------------------
// Each activation row is quantized once a call, per block of 32, to three int8 digits: s = amax /
// 127, hi = round(x / s), mid = round((x / s - hi) * 256), lo = the next 8 bits, so x = s * (hi +
// mid / 256 + lo / 65536). Two digits (16 bits) are not enough on real models: a block holding
// one of SmolLM2's outlier channels (|x| ~100x the row's rms) leaves its neighbours with a few
// bits, and logits moved 7.6e-4 against 4e-6 with three (ggml's one int8 plane: ~1e-3).
// vpdpbusd multiplies 64 unsigned weight bytes with 64 activation digits (s8), four products
// into each int32 lane: 4-bit values as they are (q4_0's -8 and q4_1's min come in the offsets),
// q8_0's as q + 128 (one xor), the 128 * sum(digits) this adds taken off by starting the sums
// at -128 * sum(digits) (`Planes::corr`): the integer sums are exact.
// A group of 16 blocks (the rows' interleaved layout, kernels/linear_q.py) takes 64-byte loads,
// "chunks": lane i of each holds 4 bytes of block i (4-bit: its low nibbles 4 of the block's
// values 0-15, its high nibbles 4 of 16-31). Every dot product of the group accumulates into the
// lane of its block: 32 values a lane and digit, |sum| <= 32 * 15 * 128 (4-bit) or 32 * 128 *
// 128 (q8_0), then hm = (dot(w, hi) << 8) + dot(w, mid) and dot(w, lo) are converted (hm exactly
// below 2^24, q8_0's to fp32's 24 bits) and two FMAs scale them by the blocks' d_w * s / 256 and
// d_w * s / 65536. Per 512 weights: 24 dot products, 12 ops to load and unpack 4-bit values (16
// for q8_0), 6 to join and scale.
// The last nb % 16 blocks go four at a time for 4-bit weights (a "quad": one 64-byte load of
// their packed values in block order, lanes 4b..4b+3 = block b: t = ((h << 8) + m) << 8 + l
// over 8 values a lane, |t| < 8 * 15 * 127 * 65793 < 2^31, one conversion, one FMA), two at a
// time for q8_0 (a "pair", lanes 8b..8b+7 = block b, joined as a group); their scales spread
// over their lanes by a permute.
constexpr int kPlanes = 3;
// a group's planes: per chunk c (q8_0's 0-7; 4-bit chunk c's low nibbles meet chunk c, its high
// ones chunk c + 4), per digit, 64 bytes
constexpr int64_t kChunkBytes = kPlanes * 64;
constexpr int64_t kGroupBytes = 8 * kChunkBytes;
constexpr int64_t kQuadBytes = 2 * 64;  // a plane of a quad: values 0-15 of its four blocks, then 16-31
constexpr int64_t kTailBytes = kPlanes * 2 * 64;  // a quad's planes, or a pair's two blocks'

// Opt-in, off by default: with a ratio R > 0 a group's third digits are kept only where one of
// its blocks holds a value above R times the row's rms (an outlier channel); elsewhere they are
// zero, the group's integer sums are the same without their dot products, and the kernels skip
// them: two digits there (16 bits a block, |error| <= amax / 65024 <= R * rms / 65024), a third
// less integer work in those groups. The rule reads one activation row only: a row's result still
// never depends on the other rows of its call. Measured with R = 16 (SmolLM2-135M, 2 threads,
// Xeon Ice Lake; 96% of gate_up's groups, 92% of down's, all of o_proj's, 45% of q/k/v's and 29% of
// lm_head's skip): decode at batch 8 0.90x the time, batch 1 0.98x, but logits 2.5e-4 (relative to
// their largest) from transformers' against 3e-6 with all three digits (R = 4: 3.5e-5, R = 8:
// 1.5e-4). XLLM_LOW_DIGIT_RATIO sets R at load, torch.ops.xllm.linear_q_low_digits while running.
std::atomic<float> kLowDigitRatio{[] {
  const char* v = std::getenv("XLLM_LOW_DIGIT_RATIO");
  return v ? static_cast<float>(std::atof(v)) : 0.f;
}()};

struct Planes {
  std::vector<int8_t> q;      // [M][row]: the groups' [8][kPlanes][64], then the tail's units
  std::vector<uint8_t> low;   // [M][ngroups]: 1 where the group's third digits are kept
  std::vector<int64_t> order;  // the M rows by their groups' flags (the kernels take rows 4 a time)
  std::vector<float> scale;   // [M][nb]: s / 65536
  std::vector<int32_t> corr;  // q8_0: [M][ngroups + units][kPlanes][16]: -128 * sum(digits) a lane
  int64_t nb = 0, ngroups = 0, units = 0, row = 0;
};

// p.order: rows 0..M-1 stably sorted by their first 64 groups' flags, so that four rows whose
// groups all drop their third digits go together (a row's result does not depend on which rows
// share its four: the order moves no bits).
inline void order_rows(int64_t M, Planes& p) {
  p.order.resize(M);
  for (int64_t m = 0; m < M; ++m) p.order[m] = m;
  if (M <= 1 || p.ngroups == 0) return;
  thread_local std::vector<uint64_t> key;
  key.assign(M, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < std::min<int64_t>(p.ngroups, 64); ++gi)
      key[m] |= uint64_t{p.low[m * p.ngroups + gi]} << gi;
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
}

// The planes of M activation rows, in the kernel's order (q8: for q8_0 weights).
void make_planes(const float* x, int64_t M, int64_t K, bool q8, Planes& p) {
  p.nb = K / 32;
  p.ngroups = p.nb / kGroup;
  const int64_t tail = p.nb % kGroup, per_unit = q8 ? 2 : 4;
  p.units = (tail + per_unit - 1) / per_unit;
  p.row = p.ngroups * kGroupBytes + p.units * kTailBytes;
  p.q.resize(M * p.row);
  // 16 zeros past the end: a group's masked 16-lane loads then never reach past the buffer
  // (masked-off lanes past an allocation's end cost ~2.5x the whole kernel at K = 576)
  p.scale.assign(M * p.nb + kMaskPad, 0.f);
  for (int64_t m = 0; m < M; ++m)  // a last unit's missing blocks read zeros
    std::memset(p.q.data() + m * p.row + p.ngroups * kGroupBytes, 0, p.units * kTailBytes);
  const __m512 sign = _mm512_set1_ps(-0.f);
  thread_local std::vector<float> amaxes;
  amaxes.resize(p.nb);
  p.low.resize(M * p.ngroups);
  for (int64_t m = 0; m < M; ++m) {
    __m512 sq = _mm512_setzero_ps();
    for (int64_t b = 0; b < p.nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      amaxes[b] = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_andnot_ps(sign, x0), _mm512_andnot_ps(sign, x1)));
      sq = _mm512_fmadd_ps(x1, x1, _mm512_fmadd_ps(x0, x0, sq));
    }
    const float ratio = kLowDigitRatio.load(std::memory_order_relaxed);
    const float limit = ratio * std::sqrt(_mm512_reduce_add_ps(sq) / static_cast<float>(K));
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const float top = *std::max_element(amaxes.begin() + gi * kGroup, amaxes.begin() + (gi + 1) * kGroup);
      p.low[m * p.ngroups + gi] = !(ratio > 0.f && top <= limit);  // NaN / inf keep all three
    }
    for (int64_t b = 0; b < p.nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = amaxes[b];
      const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      p.scale[m * p.nb + b] = s / 65536.f;
      // where digit 0 of values 0-15 goes: 4 bytes a chunk in a group, 16 in the tail's units
      const bool grouped = b < p.ngroups * kGroup;
      const bool low = !grouped || p.low[m * p.ngroups + b / kGroup];
      const int64_t t = b - p.ngroups * kGroup;
      int8_t* at = p.q.data() + m * p.row;
      at += grouped ? b / kGroup * kGroupBytes + 4 * (b % kGroup)
            : q8    ? p.ngroups * kGroupBytes + t / 2 * kTailBytes + t % 2 * 32
                    : p.ngroups * kGroupBytes + t / 4 * kTailBytes + t % 4 * 16;
      const __m512 vinv = _mm512_set1_ps(inv), k256 = _mm512_set1_ps(256.f);
      const __m512 halves[2] = {x0, x1};
      for (int h = 0; h < 2; ++h) {
        const __m512 v = _mm512_mul_ps(halves[h], vinv);
        __m512 vh = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 r1 = _mm512_mul_ps(_mm512_sub_ps(v, vh), k256);  // in [-128, 128]
        __m512 vm = _mm512_roundscale_ps(r1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512 vl = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(r1, vm), k256),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // a middle digit of 128 does not fit int8: carry it (h + 1, -128), the same number
        const __mmask16 carry = _mm512_cmp_ps_mask(vm, _mm512_set1_ps(127.5f), _CMP_GT_OQ);
        vh = _mm512_mask_add_ps(vh, carry, vh, _mm512_set1_ps(1.f));
        vm = _mm512_mask_mov_ps(vm, carry, _mm512_set1_ps(-128.f));
        const __m512i ih = _mm512_cvtps_epi32(vh), im = _mm512_cvtps_epi32(vm);
        const __m512i il = low ? _mm512_cvtps_epi32(_mm512_min_ps(
                                     _mm512_max_ps(vl, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f)))
                               : _mm512_setzero_si512();
        const __m128i digits[kPlanes] = {_mm512_cvtsepi32_epi8(ih), _mm512_cvtsepi32_epi8(im),
                                         _mm512_cvtsepi32_epi8(il)};
        for (int d = 0; d < kPlanes; ++d) {
          if (!grouped) {  // a quad's digit planes are 128 bytes apart, a pair's 64
            int8_t* dst = at + (q8 ? d * 64 + h * 16 : d * kQuadBytes + h * 64);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), digits[d]);
            continue;
          }
          alignas(16) int8_t tmp[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), digits[d]);
          for (int c = 0; c < 4; ++c)
            std::memcpy(at + (4 * h + c) * kChunkBytes + d * 64, tmp + 4 * c, 4);
        }
      }
    }
  }
  order_rows(M, p);
  if (!q8) return;
  // -128 * each lane's digit sum: one dot product with ones per chunk and digit
  const int64_t units = p.ngroups + p.units;
  p.corr.resize(M * units * kPlanes * 16);
  const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t u = 0; u < units; ++u) {
      const bool grouped = u < p.ngroups;
      const int8_t* pu = p.q.data() + m * p.row +
                         (grouped ? u * kGroupBytes : p.ngroups * kGroupBytes + (u - p.ngroups) * kTailBytes);
      for (int d = 0; d < kPlanes; ++d) {
        __m512i sum = zero;
        for (int c = 0; c < (grouped ? 8 : 1); ++c)
          sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(pu + c * kChunkBytes + d * 64));
        _mm512_storeu_si512(p.corr.data() + ((m * units + u) * kPlanes + d) * 16,
                            _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 7)));
      }
    }
}

// Lane l of a quad belongs to block l / 4 of it, of a pair to block l / 8: the permutations
// spreading a group's 16 scales over unit j's lanes.
alignas(64) static const int32_t kQuadIdx[4][16] = {
#define XLLM_QUAD(q) {4 * q, 4 * q, 4 * q, 4 * q, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q + 1, \
                      4 * q + 2, 4 * q + 2, 4 * q + 2, 4 * q + 2, 4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3}
    XLLM_QUAD(0), XLLM_QUAD(1), XLLM_QUAD(2), XLLM_QUAD(3),
#undef XLLM_QUAD
};
alignas(64) static const int32_t kPairIdx[8][16] = {
#define XLLM_PAIR(j) {2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, \
                      2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1}
    XLLM_PAIR(0), XLLM_PAIR(1), XLLM_PAIR(2), XLLM_PAIR(3),
    XLLM_PAIR(4), XLLM_PAIR(5), XLLM_PAIR(6), XLLM_PAIR(7),
#undef XLLM_PAIR
};

// A zmm's horizontal sum in the order vnni_4x1 sums its four (a row's result must not depend
// on which path computed it: bucket padding and batch composition change the path).
inline __m128 fold_512(__m512 v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline float hsum_4x1(__m512 v) {
  const __m128 q = fold_512(v);
  const __m128 t = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(t, t));
}

inline __mmask16 first_n(int64_t n) {
  return n == 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512i load_first(const uint8_t* q, int64_t bytes) {
  return bytes == 64 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8((__mmask64(1) << bytes) - 1, q);
}

// 64 bytes of packed values (the first `bytes` of them; the rest read as zeros) as their low and
// high nibbles.
struct Nibbles {
  __m512i lo, hi;
};

// With GFNI (GF) the high nibbles take one affine byte transform (result bit i = input bit i + 4)
// instead of a shift and a mask.
template <bool GF>
inline Nibbles nibbles(const uint8_t* q, int64_t bytes = 64) {
  const __m512i v = load_first(q, bytes);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  if constexpr (GF)
    return {_mm512_and_si512(v, low4),
            _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0)};
  return {_mm512_and_si512(v, low4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low4)};
}

// q8_0's 64 values as unsigned bytes, q + 128
inline __m512i biased(const uint8_t* q, int64_t bytes = 64) {
  return _mm512_xor_si512(load_first(q, bytes), _mm512_set1_epi8(static_cast<char>(0x80)));
}

// Three digit sums, lane by lane.
struct Digits {
  __m512i h, m, l;
};

inline Digits digits_from(const int32_t* corr) {  // q8_0: starting at -128 * sum(digits)
  return {_mm512_loadu_si512(corr), _mm512_loadu_si512(corr + 16), _mm512_loadu_si512(corr + 32)};
}

// 64 unsigned weight bytes' dot products with one activation row's digit planes at `pc` (LO:
// the third digits' too; without, the group's third digits are zero: Planes::low).
template <bool LO = true>
inline void chunk_dot(Digits& a, __m512i w, const int8_t* pc) {
  a.h = _mm512_dpbusd_epi32(a.h, w, _mm512_loadu_si512(pc));
  a.m = _mm512_dpbusd_epi32(a.m, w, _mm512_loadu_si512(pc + 64));
  if constexpr (LO) a.l = _mm512_dpbusd_epi32(a.l, w, _mm512_loadu_si512(pc + 128));
}

// acc + the sums scaled: hm = (h << 8) + m by d_w * s / 256 (cv * 256), l by cv (LO: l is not
// zero).
template <bool LO = true>
inline __m512 scaled(const Digits& a, __m512 cv, __m512 acc) {
  const __m512i hm = _mm512_add_epi32(_mm512_slli_epi32(a.h, 8), a.m);
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hm), _mm512_mul_ps(cv, _mm512_set1_ps(256.f)), acc);
  if constexpr (!LO) return acc;
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a.l), cv, acc);
}

// The quad's three-digit integer dot products with one activation row's planes at `pq`: each
// digit's sum over both halves, then ((h << 8) + m) << 8 + l.
inline __m512i quad_dot(const Nibbles& w, const int8_t* pq) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i h = _mm512_dpbusd_epi32(zero, w.lo, _mm512_loadu_si512(pq));
  __m512i m = _mm512_dpbusd_epi32(zero, w.lo, _mm512_loadu_si512(pq + kQuadBytes));
  __m512i l = _mm512_dpbusd_epi32(zero, w.lo, _mm512_loadu_si512(pq + 2 * kQuadBytes));
  h = _mm512_dpbusd_epi32(h, w.hi, _mm512_loadu_si512(pq + 64));
  m = _mm512_dpbusd_epi32(m, w.hi, _mm512_loadu_si512(pq + kQuadBytes + 64));
  l = _mm512_dpbusd_epi32(l, w.hi, _mm512_loadu_si512(pq + 2 * kQuadBytes + 64));
  return _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(_mm512_slli_epi32(h, 8), m), 8), l);
}

// A group's (or the tail's) weight scales times the activation scales, cv = d_w * s / 65536;
// acc gets the 4-bit offsets (q4_1 + m * sum(x), q4_0 - 8 d * sum(x)) in one FMA.
template <QType T>
inline __m512 group_scales(const Row32& r, int64_t g, __mmask16 mask, __m512 sv, __m512 xs,
                           __m512& acc) {
  const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.d + 2 * g));
  if constexpr (T != QType::Q8_0) {
    const __m512 ov = T == QType::Q4_1
                          ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, r.m + 2 * g))
                          : _mm512_mul_ps(dv, _mm512_set1_ps(-8.f));
    acc = _mm512_fmadd_ps(ov, xs, acc);
  }
  return _mm512_mul_ps(dv, sv);
}

// One weight row's group gi against activation rows 0..R-1 (planes pa[i], q8_0 corrections
// ca[i]): the digit sums of its chunks, accumulated into a[i].
template <QType T, bool GF, int R, bool LO>
inline void group_dots(const uint8_t* qs, int64_t gi, const int8_t* const* pa, Digits* a) {
  if constexpr (T == QType::Q8_0) {
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      const __m512i w = biased(qs + gi * kGroup * 32 + 64 * c);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i)
        chunk_dot<LO>(a[i], w, pa[i] + gi * kGroupBytes + c * kChunkBytes);
    }
  } else {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const Nibbles w = nibbles<GF>(qs + gi * kGroup * 16 + 64 * c);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        chunk_dot<LO>(a[i], w.lo, pa[i] + gi * kGroupBytes + c * kChunkBytes);
        chunk_dot<LO>(a[i], w.hi, pa[i] + gi * kGroupBytes + (c + 4) * kChunkBytes);
      }
    }
  }
}

// acc += the tail's unit j of one weight row against one activation row (planes pt at the
// unit, q8_0 corrections ct at the unit; cv: the tail's scales).
template <QType T, bool GF>
inline __m512 tail_unit(const uint8_t* q, int64_t bytes, int64_t j, const int8_t* pt,
                        const int32_t* ct, __m512 cv, __m512 acc) {
  if constexpr (T == QType::Q8_0) {
    Digits a = digits_from(ct);
    chunk_dot(a, biased(q, bytes), pt);
    return scaled(a, _mm512_permutexvar_ps(_mm512_load_si512(kPairIdx[j]), cv), acc);
  } else {
    const __m512i t = quad_dot(nibbles<GF>(q, bytes), pt);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(t),
                           _mm512_permutexvar_ps(_mm512_load_si512(kQuadIdx[j]), cv), acc);
  }
}

constexpr int64_t per_unit(QType t) { return t == QType::Q8_0 ? 2 : 4; }

// y[idx[m]] = x[idx[m]] . row for MB activation rows over one weight row: per group the offsets,
// its chunks' dot products, its two scaled sums; then the tail's units (vnni_4x1 does the same
// per row, in the same order).
template <QType T, bool GF, int MB>
inline void vnni_rows(const uint8_t* row, int64_t K, const Planes& P, const int64_t* idx,
                      const float* sums, float* y) {
  const Row32 r = row32(T, row, K);
  const int64_t nb = r.nb, vb = value_bytes(T), units = P.ngroups + P.units;
  __m512 acc[MB], cv[MB];
  const int8_t* pm[MB];  // each activation row's planes
  const int32_t* cm[MB];  // and q8_0 corrections
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    acc[m] = _mm512_setzero_ps();
    pm[m] = P.q.data() + idx[m] * P.row;
    cm[m] = T == QType::Q8_0 ? P.corr.data() + idx[m] * units * kPlanes * 16 : nullptr;
  }
  for (int64_t gi = 0; gi < P.ngroups; ++gi) {
    const int64_t g = gi * kGroup;
    Digits a[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      cv[m] = group_scales<T>(r, g, 0xFFFF, _mm512_loadu_ps(P.scale.data() + idx[m] * nb + g),
                              _mm512_loadu_ps(sums + idx[m] * nb + g), acc[m]);
      a[m] = T == QType::Q8_0 ? digits_from(cm[m] + gi * kPlanes * 16)
                              : Digits{_mm512_setzero_si512(), _mm512_setzero_si512(),
                                       _mm512_setzero_si512()};
    }
    // the third digits' products where one of the rows keeps them (the others' are zeros)
    bool low = false;
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) low |= P.low[idx[m] * P.ngroups + gi] != 0;
    if (low) {
      group_dots<T, GF, MB, true>(r.qs, gi, pm, a);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m] = scaled<true>(a[m], cv[m], acc[m]);
    } else {
      group_dots<T, GF, MB, false>(r.qs, gi, pm, a);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) acc[m] = scaled<false>(a[m], cv[m], acc[m]);
    }
  }
  if (const int64_t g = P.ngroups * kGroup; g < nb) {  // the tail, a unit at a time
    const int64_t n = nb - g;
    const __mmask16 mask = first_n(n);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
      cv[m] = group_scales<T>(r, g, mask, _mm512_maskz_loadu_ps(mask, P.scale.data() + idx[m] * nb + g),
                              _mm512_maskz_loadu_ps(mask, sums + idx[m] * nb + g), acc[m]);
    for (int64_t j = 0; j < P.units; ++j) {
      const int64_t bytes = vb * std::min<int64_t>(per_unit(T), n - j * per_unit(T));
      const uint8_t* q = r.qs + vb * (g + j * per_unit(T));
      const int64_t at = P.ngroups * kGroupBytes + j * kTailBytes;
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[m] = tail_unit<T, GF>(q, bytes, j, pm[m] + at,
                                  T == QType::Q8_0 ? cm[m] + (P.ngroups + j) * kPlanes * 16 : nullptr,
                                  cv[m], acc[m]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) y[idx[m]] = hsum_4x1(acc[m]);
}

// Four weight rows' group at block g against one activation row's planes of it (pg).
template <QType T, bool GF, bool LO>
inline void group_4x1(const Row32* r, int64_t g, const int8_t* pg, Digits* a) {
  constexpr int R = 4;
  if constexpr (T == QType::Q8_0) {
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c)
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i)
        chunk_dot<LO>(a[i], biased(r[i].qs + g * 32 + 64 * c), pg + c * kChunkBytes);
  } else {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        const Nibbles wv = nibbles<GF>(r[i].qs + g * 16 + 64 * c);
        chunk_dot<LO>(a[i], wv.lo, pg + c * kChunkBytes);
        chunk_dot<LO>(a[i], wv.hi, pg + (c + 4) * kChunkBytes);
      }
  }
}

// Four weight rows against one activation row (a batch-1 decode step): the four chains
// interleave and the four sums reduce together (a row's own horizontal sum was a quarter of its
// time at K = 576); each row's arithmetic is vnni_rows'.
template <QType T, bool GF>
inline void vnni_4x1(const uint8_t* w, int64_t row_bytes, int64_t K, const Planes& P,
                     const float* sums, float* y) {
  constexpr int R = 4;
  Row32 r[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) r[i] = row32(T, w + i * row_bytes, K);
  const int64_t nb = r[0].nb, vb = value_bytes(T);
  __m512 acc[R], cv[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const int8_t* const pa[R] = {P.q.data(), P.q.data(), P.q.data(), P.q.data()};  // shared
  for (int64_t gi = 0; gi < P.ngroups; ++gi) {
    const int64_t g = gi * kGroup;
    const __m512 sv = _mm512_loadu_ps(P.scale.data() + g), xs = _mm512_loadu_ps(sums + g);
    Digits a[R];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      cv[i] = group_scales<T>(r[i], g, 0xFFFF, sv, xs, acc[i]);
      a[i] = T == QType::Q8_0 ? digits_from(P.corr.data() + gi * kPlanes * 16)
                              : Digits{_mm512_setzero_si512(), _mm512_setzero_si512(),
                                       _mm512_setzero_si512()};
    }
    if (P.low[gi]) {
      group_4x1<T, GF, true>(r, g, pa[0] + gi * kGroupBytes, a);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[i] = scaled<true>(a[i], cv[i], acc[i]);
    } else {
      group_4x1<T, GF, false>(r, g, pa[0] + gi * kGroupBytes, a);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) acc[i] = scaled<false>(a[i], cv[i], acc[i]);
    }
  }
  if (const int64_t g = P.ngroups * kGroup; g < nb) {
    const int64_t n = nb - g;
    const __mmask16 mask = first_n(n);
    const __m512 sv = _mm512_maskz_loadu_ps(mask, P.scale.data() + g);
    const __m512 xs = _mm512_maskz_loadu_ps(mask, sums + g);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) cv[i] = group_scales<T>(r[i], g, mask, sv, xs, acc[i]);
    for (int64_t j = 0; j < P.units; ++j) {
      const int64_t bytes = vb * std::min<int64_t>(per_unit(T), n - j * per_unit(T));
      const int8_t* pt = P.q.data() + P.ngroups * kGroupBytes + j * kTailBytes;
      const int32_t* ct = T == QType::Q8_0 ? P.corr.data() + (P.ngroups + j) * kPlanes * 16 : nullptr;
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i)
        acc[i] = tail_unit<T, GF>(r[i].qs + vb * (g + j * per_unit(T)), bytes, j, pt, ct, cv[i], acc[i]);
    }
  }
  // the four horizontal sums at once: 512 -> 256 -> 128 bits each, then a 4x4 transpose-add
  __m128 q[R];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) q[i] = fold_512(acc[i]);
  const __m128 s01 = _mm_hadd_ps(q[0], q[1]), s23 = _mm_hadd_ps(q[2], q[3]);
  _mm_storeu_ps(y, _mm_hadd_ps(s01, s23));
}

template <QType T, bool GF>
void vnni_any(const uint8_t* row, int64_t K, const Planes& P, const float* sums, int64_t rows,
              float* y) {
  // rows in P.order: those that keep the same groups' third digits go four together
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const int64_t* idx = P.order.data() + m0;
    switch (std::min<int64_t>(rows - m0, 4)) {
      case 4: vnni_rows<T, GF, 4>(row, K, P, idx, sums, y); break;
      case 3: vnni_rows<T, GF, 3>(row, K, P, idx, sums, y); break;
      case 2: vnni_rows<T, GF, 2>(row, K, P, idx, sums, y); break;
      default: vnni_rows<T, GF, 1>(row, K, P, idx, sums, y); break;
    }
  }
}

#pragma GCC pop_options

// ---- AVX2 + FMA ------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline float half_f16c2(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

void decode_row_256(const Format& f, const uint8_t* row, int64_t K, float* y) {
  if (f.block != 32) return decode_row_plain(f, row, K, y);
  const Row32 r = row32(f.type, row, K);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < r.nb; ++b, y += 32) {
    const __m256 d = _mm256_set1_ps(half_f16c2(r.d + 2 * b));
    if (f.type == QType::Q8_0) {
      for (int h = 0; h < 2; ++h) {
        const __m128i v = values_xmm(f.type, r, b, h);
        const __m128i parts[2] = {v, _mm_srli_si128(v, 8)};
        for (int i = 0; i < 2; ++i)
          _mm256_storeu_ps(y + 16 * h + 8 * i,
                           _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])), d));
      }
      continue;
    }
    const __m128i v = values_xmm(f.type, r, b);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) {
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
      __m256 w;
      if (f.type == QType::Q4_0) {  // (q - 8) * d, as the reference rounds it
        w = _mm256_mul_ps(_mm256_sub_ps(qf, _mm256_set1_ps(8.f)), d);
      } else {  // q * d + m rounded once (the reference rounds the product, then the sum)
        w = _mm256_fmadd_ps(qf, d, _mm256_set1_ps(half_f16c2(r.m + 2 * b)));
      }
      _mm256_storeu_ps(y + 8 * i, w);
    }
  }
}

template <int MB>
inline void dot_rows_256(const float* x, int64_t ldx, const float* w, int64_t K, float* y) {
  __m256 acc[MB][4];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * j);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[m][j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * ldx + k + 8 * j), wv, acc[m][j]);
    }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                                    _mm256_add_ps(acc[m][2], acc[m][3])));
    for (int64_t j = k; j < K; ++j) s += x[m * ldx + j] * w[j];
    y[m] = s;
  }
}


// ---- AVX2: the integer path on 256-bit registers (q4_0 / q4_1) -----------------------------
// The VNNI path's arithmetic without vpdpbusd: the same activation planes (make_planes_256 writes
// make_planes' bytes), the same weight layout, each 64-byte chunk taken as two halves of 8 blocks.
// vpmaddubsw multiplies 32 unsigned 4-bit values by 32 digits (s8) into 16 pair sums (s16,
// |pair| <= 2 * 15 * 128 = 3840: no saturation); the 8 pair sums of a half's chunks (4 chunks,
// low and high nibbles) add in 16 bits (|sum| <= 30720 < 2^15), one vpmaddwd with ones widens
// them: lane i then holds block i's 32-value digit sum, exactly the VNNI path's integer. The
// scaling and offsets are the VNNI path's, 8 lanes at a time. Per 256 weights and activation
// row: 24 multiplies, 24 16-bit adds, 3 widenings, 16 ops to load and unpack, 8 to join and scale.

inline __m256 abs_max_256(const float* xb) {  // max |x| over 32 values, broadcast
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb)),
                           _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8)));
  m = _mm256_max_ps(m, _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 16)),
                                     _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 24))));
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
  return _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1));
}

// An empty asm that takes the accumulators in registers: GCC otherwise reassociates a chain of
// integer adds into a tree over all the products of a loop, each product spilled to the stack
// first (measured on a Zen 3: the kernels 1.1-1.7x slower without it).
#define XLLM_IN_REGS(...) __asm__("" : __VA_ARGS__)

// 16-bit pair sums -> 32-bit lane sums
inline __m256i widen(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

// 16 int32 (two registers) -> 16 int8, saturating (as vpmovsdb)
inline __m128i pack_s8(__m256i a, __m256i b) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// make_planes' bytes for 4-bit weights, on AVX2 (the same roundings, in the same order).
void make_planes_256(const float* x, int64_t M, int64_t K, Planes& p) {
  p.nb = K / 32;
  p.ngroups = p.nb / kGroup;
  p.units = (p.nb % kGroup + 3) / 4;
  p.row = p.ngroups * kGroupBytes + p.units * kTailBytes;
  p.q.resize(M * p.row);
  p.scale.assign(M * p.nb + kMaskPad, 0.f);
  for (int64_t m = 0; m < M; ++m)
    std::memset(p.q.data() + m * p.row + p.ngroups * kGroupBytes, 0, p.units * kTailBytes);
  const __m256 k256 = _mm256_set1_ps(256.f), half = _mm256_set1_ps(127.5f);
  const __m256 lo_min = _mm256_set1_ps(-127.f), lo_max = _mm256_set1_ps(127.f);
  p.low.resize(M * p.ngroups);
  thread_local std::vector<float> amaxes;
  amaxes.resize(p.nb);
  for (int64_t m = 0; m < M; ++m) {
    // make_planes' rule for the third digits (Planes::low)
    __m256 sq = _mm256_setzero_ps();
    for (int64_t b = 0; b < p.nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      amaxes[b] = _mm256_cvtss_f32(abs_max_256(xb));
      for (int e = 0; e < 4; ++e) {
        const __m256 v = _mm256_loadu_ps(xb + 8 * e);
        sq = _mm256_fmadd_ps(v, v, sq);
      }
    }
    const float ratio = kLowDigitRatio.load(std::memory_order_relaxed);
    const float limit = ratio * std::sqrt(hsum256(sq) / static_cast<float>(K));
    for (int64_t gi = 0; gi < p.ngroups; ++gi) {
      const float top = *std::max_element(amaxes.begin() + gi * kGroup, amaxes.begin() + (gi + 1) * kGroup);
      p.low[m * p.ngroups + gi] = !(ratio > 0.f && top <= limit);
    }
    for (int64_t b = 0; b < p.nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      const float amax = amaxes[b];
      const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      p.scale[m * p.nb + b] = s / 65536.f;
      const bool grouped = b < p.ngroups * kGroup;
      const bool low = !grouped || p.low[m * p.ngroups + b / kGroup];
      const int64_t t = b - p.ngroups * kGroup;
      int8_t* at = p.q.data() + m * p.row;
      at += grouped ? b / kGroup * kGroupBytes + 4 * (b % kGroup)
                    : p.ngroups * kGroupBytes + t / 4 * kTailBytes + t % 4 * 16;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int h = 0; h < 2; ++h) {
        __m256i ih[2], im[2], il[2];
        for (int e = 0; e < 2; ++e) {
          const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 16 * h + 8 * e), vinv);
          __m256 vh = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m256 r1 = _mm256_mul_ps(_mm256_sub_ps(v, vh), k256);
          __m256 vm = _mm256_round_ps(r1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m256 vl = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(r1, vm), k256),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          const __m256 carry = _mm256_cmp_ps(vm, half, _CMP_GT_OQ);
          vh = _mm256_add_ps(vh, _mm256_and_ps(carry, _mm256_set1_ps(1.f)));
          vm = _mm256_blendv_ps(vm, _mm256_set1_ps(-128.f), carry);
          ih[e] = _mm256_cvtps_epi32(vh);
          im[e] = _mm256_cvtps_epi32(vm);
          il[e] = low ? _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(vl, lo_min), lo_max))
                      : _mm256_setzero_si256();
        }
        const __m128i digits[kPlanes] = {pack_s8(ih[0], ih[1]), pack_s8(im[0], im[1]),
                                         pack_s8(il[0], il[1])};
        for (int d = 0; d < kPlanes; ++d) {
          if (!grouped) {  // a quad's digit planes are 128 bytes apart
            _mm_storeu_si128(reinterpret_cast<__m128i*>(at + d * kQuadBytes + h * 64), digits[d]);
            continue;
          }
          alignas(16) int8_t tmp[16];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), digits[d]);
          for (int c = 0; c < 4; ++c)
            std::memcpy(at + (4 * h + c) * kChunkBytes + d * 64, tmp + 4 * c, 4);
        }
      }
    }
  }
}

// 32 bytes of packed 4-bit values as low and high nibbles
inline void nibbles_256(__m256i v, __m256i& lo, __m256i& hi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(v, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
}

inline __m256i load_256(const void* p) {  // 32 bytes, unaligned (a plane's, a chunk's)
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

inline __m256i load_half(const uint8_t* q, int64_t bytes) {  // the first `bytes` (0, 16, 32)
  if (bytes >= 32) return load_256(q);
  if (bytes >= 16) return _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm256_setzero_si256();
}

// 8 fp16 at p widened, the lanes from `valid` on zero (a tail's missing blocks: their sums are 0,
// their scale must not be the next bytes read as a NaN). p + 16 stays inside the row.
inline __m256 halves_256(const uint8_t* p, int64_t valid = 8) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (valid < 8)
    v = _mm_and_si128(v, _mm_cmpgt_epi16(_mm_set1_epi16(static_cast<int16_t>(valid)),
                                         _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7)));
  return _mm256_cvtph_ps(v);
}

// A half group's (8 blocks') integer sums, one weight row against one activation row: q at the
// half's first chunk (chunks 64 bytes apart), pg at its planes (chunk c's at pg + c * kChunkBytes).
// hm = (h << 8) + m and l, lane i for block i. Locals only: GCC kept arrays of these sums on the
// stack (every add a spill), at half the speed.
struct HalfSums {
  __m256i hm, l;
};

// One chunk's low and high nibbles against one activation row's digit planes of the chunk (pl)
// and of its high nibbles' chunk (ph), into the 16-bit sums h, m, l.
__attribute__((always_inline)) inline void chunk_sums(__m256i lo, __m256i hi, const int8_t* pl,
                                                      const int8_t* ph, __m256i& h, __m256i& m,
                                                      __m256i& l) {
  h = _mm256_add_epi16(h, _mm256_maddubs_epi16(lo, load_256(pl)));
  m = _mm256_add_epi16(m, _mm256_maddubs_epi16(lo, load_256(pl + 64)));
  l = _mm256_add_epi16(l, _mm256_maddubs_epi16(lo, load_256(pl + 128)));
  h = _mm256_add_epi16(h, _mm256_maddubs_epi16(hi, load_256(ph)));
  m = _mm256_add_epi16(m, _mm256_maddubs_epi16(hi, load_256(ph + 64)));
  l = _mm256_add_epi16(l, _mm256_maddubs_epi16(hi, load_256(ph + 128)));
}

inline HalfSums joined(__m256i h, __m256i m, __m256i l) {
  return {_mm256_add_epi32(_mm256_slli_epi32(widen(h), 8), widen(m)), widen(l)};
}

inline HalfSums half_sums(const uint8_t* q, const int8_t* pg) {
  __m256i h = _mm256_setzero_si256(), m = h, l = h;
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    __m256i lo, hi;
    nibbles_256(load_256(q + 64 * c), lo, hi);
    chunk_sums(lo, hi, pg + c * kChunkBytes, pg + (c + 4) * kChunkBytes, h, m, l);
    XLLM_IN_REGS("+x"(h), "+x"(m), "+x"(l));
  }
  return joined(h, m, l);
}

// A quad half's (blocks 2 of a tail unit) sum t = ((h << 8) + m) << 8 + l a lane (VNNI's quad_dot):
// q at its 32 weight bytes (`bytes` of them real), pt at the unit's planes + 32 * half.
inline __m256i quad_half(const uint8_t* q, int64_t bytes, const int8_t* pt) {
  __m256i lo, hi;
  nibbles_256(load_half(q, bytes), lo, hi);
  __m256i h = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load_256(pt)), _mm256_maddubs_epi16(hi, load_256(pt + 64)));
  __m256i m = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load_256(pt + kQuadBytes)),
                               _mm256_maddubs_epi16(hi, load_256(pt + kQuadBytes + 64)));
  __m256i l = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load_256(pt + 2 * kQuadBytes)),
                               _mm256_maddubs_epi16(hi, load_256(pt + 2 * kQuadBytes + 64)));
  return _mm256_add_epi32(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_slli_epi32(widen(h), 8), widen(m)), 8), widen(l));
}

// A half group's (8 blocks') sums against two activation rows' planes at pg0 and pg1: half_sums
// twice, each chunk's nibbles unpacked once for both (the same sums, bit for bit).
inline void half_sums2(const uint8_t* q, const int8_t* pg0, const int8_t* pg1, HalfSums& s0,
                       HalfSums& s1) {
  __m256i h0 = _mm256_setzero_si256(), m0 = h0, l0 = h0, h1 = h0, m1 = h0, l1 = h0;
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    __m256i lo, hi;
    nibbles_256(load_256(q + 64 * c), lo, hi);
    chunk_sums(lo, hi, pg0 + c * kChunkBytes, pg0 + (c + 4) * kChunkBytes, h0, m0, l0);
    chunk_sums(lo, hi, pg1 + c * kChunkBytes, pg1 + (c + 4) * kChunkBytes, h1, m1, l1);
    XLLM_IN_REGS("+x"(h0), "+x"(m0), "+x"(l0), "+x"(h1), "+x"(m1), "+x"(l1));
  }
  s0 = joined(h0, m0, l0);
  s1 = joined(h1, m1, l1);
}

// The offsets' factor of blocks b..b+7 (the lanes from `valid` on zero): q4_1's mins, q4_0's -8 d.
template <QType T>
inline __m256 mins_256(const Row32& r, int64_t b, __m256 dv, int64_t valid) {
  if constexpr (T == QType::Q4_1) return halves_256(r.m + 2 * b, valid);
  return _mm256_mul_ps(dv, _mm256_set1_ps(-8.f));
}

// A half group's contribution to one activation row's lanes: the offsets o * sum(x), then the
// integer sums scaled by cv = d_w * s / 65536 (hm by 256 cv). sc, xs: the row's scales and sums.
template <QType T>
inline __m256 half_step(const Row32& r, int64_t b, const HalfSums& s, const float* sc,
                        const float* xs, __m256 acc) {
  const __m256 dv = halves_256(r.d + 2 * b);
  acc = _mm256_fmadd_ps(mins_256<T>(r, b, dv, 8), _mm256_loadu_ps(xs + b), acc);
  const __m256 cv = _mm256_mul_ps(dv, _mm256_loadu_ps(sc + b));
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s.hm), _mm256_mul_ps(cv, _mm256_set1_ps(256.f)), acc);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s.l), cv, acc);
}

// The tail's quads of 4 blocks against activation row m, lane by lane, added to acc.
template <QType T>
inline __m256 avx2_tail(const Row32& r, const Planes& P, int64_t m, const float* sums,
                        __m256 acc) {
  const int64_t nb = r.nb, g = P.ngroups * kGroup;
  if (g >= nb) return acc;
  const int8_t* pm = P.q.data() + m * P.row;
  const float* sc = P.scale.data() + m * nb;
  const float* xs = sums + m * nb;
  const int64_t n = nb - g;
  __m256 cv[2];
  for (int e = 0; e < 2; ++e) {
    if (e && n <= 8) break;
    const int64_t b = g + 8 * e;
    const __m256 dv = halves_256(r.d + 2 * b, n - 8 * e);
    acc = _mm256_fmadd_ps(mins_256<T>(r, b, dv, n - 8 * e), _mm256_loadu_ps(xs + b), acc);
    cv[e] = _mm256_mul_ps(dv, _mm256_loadu_ps(sc + b));
  }
  for (int64_t j = 0; j < P.units; ++j) {
    const int64_t bytes = 16 * std::min<int64_t>(4, n - 4 * j);
    const uint8_t* q = r.qs + 16 * (g + 4 * j);
    const int8_t* pt = pm + P.ngroups * kGroupBytes + j * kTailBytes;
    for (int h = 0; h < 2 && 32 * h < bytes; ++h) {  // blocks 4j + 2h (lanes 0-3), 4j + 2h + 1
      const __m256i t = quad_half(q + 32 * h, bytes - 32 * h, pt + 32 * h);
      const int b = static_cast<int>(4 * j + 2 * h) & 7;
      const __m256i idx = _mm256_setr_epi32(b, b, b, b, b + 1, b + 1, b + 1, b + 1);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_permutevar8x32_ps(cv[j >= 2], idx), acc);
    }
  }
  return acc;
}

// One weight row against activation row m of P: the 8 lane partial sums (avx2_sum reduces them):
// each half group's step, then the tail.
template <QType T>
inline __m256 avx2_row(const uint8_t* row, int64_t K, const Planes& P, int64_t m,
                       const float* sums) {
  const Row32 r = row32(T, row, K);
  const int8_t* pm = P.q.data() + m * P.row;
  const float* sc = P.scale.data() + m * r.nb;
  const float* xs = sums + m * r.nb;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < P.ngroups; ++gi)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const HalfSums s = half_sums(r.qs + gi * kGroup * 16 + 32 * h, pm + gi * kGroupBytes + 32 * h);
      acc = half_step<T>(r, gi * kGroup + 8 * h, s, sc, xs, acc);
    }
  return avx2_tail<T>(r, P, m, sums, acc);
}

// avx2_row for activation rows m and m + 1 (batch steps): each row's steps and their order are
// avx2_row's (the same result, bit for bit), the weights unpacked once for both.
template <QType T>
inline void avx2_row2(const uint8_t* row, int64_t K, const Planes& P, int64_t m,
                      const float* sums, __m256& acc0, __m256& acc1) {
  const Row32 r = row32(T, row, K);
  const int8_t* pm = P.q.data() + m * P.row;
  const float* sc = P.scale.data() + m * r.nb;
  const float* xs = sums + m * r.nb;
  acc0 = acc1 = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < P.ngroups; ++gi)
    for (int h = 0; h < 2; ++h) {
      const int64_t at = gi * kGroupBytes + 32 * h, b = gi * kGroup + 8 * h;
      HalfSums s0, s1;
      half_sums2(r.qs + gi * kGroup * 16 + 32 * h, pm + at, pm + P.row + at, s0, s1);
      acc0 = half_step<T>(r, b, s0, sc, xs, acc0);
      acc1 = half_step<T>(r, b, s1, sc + r.nb, xs + r.nb, acc1);
    }
  acc0 = avx2_tail<T>(r, P, m, sums, acc0);
  acc1 = avx2_tail<T>(r, P, m + 1, sums, acc1);
}

// A row's sum of its 8 lanes, in the order avx2_4x1 sums four at once: ((0+4)+(1+5))+((2+6)+(3+7)).
inline __m128 fold_256(__m256 v) {
  return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

inline float avx2_sum(__m256 v) {
  const __m128 q = fold_256(v);
  const __m128 t = _mm_hadd_ps(q, q);
  return _mm_cvtss_f32(_mm_hadd_ps(t, t));
}

template <QType T>
void avx2_any(const uint8_t* row, int64_t K, const Planes& P, const float* sums, int64_t rows,
              float* y) {
  int64_t m = 0;
  for (; m + 2 <= rows; m += 2) {  // pairs of activation rows
    __m256 a0, a1;
    avx2_row2<T>(row, K, P, m, sums, a0, a1);
    y[m] = avx2_sum(a0);
    y[m + 1] = avx2_sum(a1);
  }
  for (; m < rows; ++m) y[m] = avx2_sum(avx2_row<T>(row, K, P, m, sums));
}

// Four weight rows against activation row 0 (a batch-1 step): their four sums reduced together.
template <QType T>
void avx2_4x1(const uint8_t* w, int64_t row_bytes, int64_t K, const Planes& P, const float* sums,
              float* y) {
  __m128 q[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) q[i] = fold_256(avx2_row<T>(w + i * row_bytes, K, P, 0, sums));
  _mm_storeu_ps(y, _mm_hadd_ps(_mm_hadd_ps(q[0], q[1]), _mm_hadd_ps(q[2], q[3])));
}

// ---- AVX2, q8_0: 16-bit activation planes and vpmaddwd ---------------------------------------
// The byte planes cost q8_0 two vpmaddubsw a plane (its values split into nibbles, so that no
// 16-bit product sum saturates): 48 multiplies per 256 weights. Here each activation is two 16-bit
// digits instead, s = amax / 32767 per block of 32, hi = round(x / s), lo = round((x / s - hi) *
// 32768) (|lo| <= 16384), x = s * (hi + lo / 32768): ~30 bits, and the weights are sign-extended
// to 16 bits: vpmaddwd's pair sums are exact (|block sum| <= 32 * 128 * 32767 < 2^31). 32
// multiplies per 256 weights. A half group's weights are 8 chunks of 32 bytes (block i's 4 values
// at bytes 4i..4i+3); its planes per chunk and digit 32 int16 in the same order (64 bytes), so
// vpmaddwd leaves two lanes per block, joined by one hadd per half and digit.
struct Planes16 {
  std::vector<int16_t> q;    // [M][row]: per group, half, chunk, digit: 32; then per tail block, digit: 32
  std::vector<float> scale;  // [M][nb]: s
  int64_t nb = 0, ngroups = 0, row = 0;  // row in int16
};

void make_planes16(const float* x, int64_t M, int64_t K, Planes16& p) {
  p.nb = K / 32;
  p.ngroups = p.nb / kGroup;
  p.row = p.nb * 64;  // 32 values, two digits, a block
  p.q.resize(M * p.row);
  p.scale.assign(M * p.nb + kMaskPad, 0.f);
  const __m256 k32768 = _mm256_set1_ps(32768.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < p.nb; ++b) {
      const float* xb = x + m * K + 32 * b;
      const float amax = _mm256_cvtss_f32(abs_max_256(xb));
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      p.scale[m * p.nb + b] = amax / 32767.f;
      alignas(32) int16_t hi[32], lo[32];
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int e = 0; e < 4; e += 2) {
        __m256i ih[2], il[2];
        for (int k = 0; k < 2; ++k) {
          const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + 8 * (e + k)), vinv);
          const __m256 vh = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          ih[k] = _mm256_cvtps_epi32(vh);
          il[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, vh), k32768),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
        // 16 int32 -> int16 in order (packs works per 128-bit lane)
        _mm256_store_si256(reinterpret_cast<__m256i*>(hi + 8 * e),
                           _mm256_permute4x64_epi64(_mm256_packs_epi32(ih[0], ih[1]), 0xD8));
        _mm256_store_si256(reinterpret_cast<__m256i*>(lo + 8 * e),
                           _mm256_permute4x64_epi64(_mm256_packs_epi32(il[0], il[1]), 0xD8));
      }
      int16_t* at = p.q.data() + m * p.row;
      if (b < p.ngroups * kGroup) {  // chunk c holds values 4c..4c+3 of block i at 4i
        const int64_t gi = b / kGroup, i = b % kGroup, h = i / 8, bi = i % 8;
        for (int c = 0; c < 8; ++c) {
          int16_t* dst = at + (((gi * 2 + h) * 8 + c) * 2) * 32 + 4 * bi;
          std::memcpy(dst, hi + 4 * c, 8);
          std::memcpy(dst + 32, lo + 4 * c, 8);
        }
      } else {
        int16_t* dst = at + b * 64;
        std::memcpy(dst, hi, 64);
        std::memcpy(dst + 32, lo, 64);
      }
    }
}

// 16 int8 weights at p, sign-extended to int16: one vpmovsxbw from memory (a 32-byte load split
// by vextracti128 cost two more ops a chunk; GCC also loaded the low half a second time).
inline __m256i widen_s8(const uint8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One chunk of 32 weights (wa: blocks 0-3's 4 values, wb: 4-7's) against one activation row's
// digits at pc, into the lane sums ha, hb (hi digits) and la, lb (lo digits).
__attribute__((always_inline)) inline void q8_chunk(__m256i wa, __m256i wb, const int16_t* pc,
                                                    __m256i& ha, __m256i& hb, __m256i& la,
                                                    __m256i& lb) {
  ha = _mm256_add_epi32(ha, _mm256_madd_epi16(wa, load_256(pc)));
  hb = _mm256_add_epi32(hb, _mm256_madd_epi16(wb, load_256(pc + 16)));
  la = _mm256_add_epi32(la, _mm256_madd_epi16(wa, load_256(pc + 32)));
  lb = _mm256_add_epi32(lb, _mm256_madd_epi16(wb, load_256(pc + 48)));
}

// Per-block digit sums H (hi) and L (lo) scaled into acc: H * cv + L * cv / 32768.
inline __m256 q8_scaled(__m256i H, __m256i L, __m256 cv, __m256 acc) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(H), cv, acc);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(L), _mm256_mul_ps(cv, _mm256_set1_ps(1.f / 32768.f)), acc);
}

// A half group's lane sums joined per block (H, L) and scaled into acc.
inline __m256 q8_half_step(__m256i ha, __m256i hb, __m256i la, __m256i lb, __m256 cv, __m256 acc) {
  const __m256i H = _mm256_permute4x64_epi64(_mm256_hadd_epi32(ha, hb), 0xD8);
  const __m256i L = _mm256_permute4x64_epi64(_mm256_hadd_epi32(la, lb), 0xD8);
  return q8_scaled(H, L, cv, acc);
}

// The tail's blocks against activation row m, one at a time in their lanes, added to acc.
inline __m256 avx2_tail_q8(const Row32& r, const Planes16& P, int64_t m, __m256 acc) {
  const int16_t* pm = P.q.data() + m * P.row;
  const float* sc = P.scale.data() + m * r.nb;
  for (int64_t b = P.ngroups * kGroup; b < r.nb; ++b) {
    const __m256i wa = widen_s8(r.qs + 32 * b), wb = widen_s8(r.qs + 32 * b + 16);
    const int16_t* pb = pm + b * 64;
    const __m256i H = _mm256_add_epi32(_mm256_madd_epi16(wa, load_256(pb)), _mm256_madd_epi16(wb, load_256(pb + 16)));
    const __m256i L = _mm256_add_epi32(_mm256_madd_epi16(wa, load_256(pb + 32)), _mm256_madd_epi16(wb, load_256(pb + 48)));
    acc = q8_scaled(H, L, _mm256_set1_ps(half_f16c2(r.d + 2 * b) * sc[b]), acc);
  }
  return acc;
}

// One q8_0 weight row against activation row m: 8 lane partial sums (avx2_sum reduces them). Per
// half group: H = sum(w * hi), L = sum(w * lo) per block, acc += H * d s + L * d s / 32768; the
// tail's blocks one at a time, in their lanes.
inline __m256 avx2_row_q8(const uint8_t* row, int64_t K, const Planes16& P, int64_t m) {
  const Row32 r = row32(QType::Q8_0, row, K);
  const int16_t* pm = P.q.data() + m * P.row;
  const float* sc = P.scale.data() + m * r.nb;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < P.ngroups; ++gi)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const uint8_t* q = r.qs + gi * kGroup * 32 + 32 * h;
      const int16_t* pg = pm + (gi * 2 + h) * 8 * 64;
      __m256i ha = _mm256_setzero_si256(), hb = ha, la = ha, lb = ha;  // a: blocks 0-3, b: 4-7
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        q8_chunk(widen_s8(q + 64 * c), widen_s8(q + 64 * c + 16), pg + c * 64, ha, hb, la, lb);
        XLLM_IN_REGS("+x"(ha), "+x"(hb), "+x"(la), "+x"(lb));
      }
      const int64_t b = gi * kGroup + 8 * h;
      const __m256 cv = _mm256_mul_ps(halves_256(r.d + 2 * b), _mm256_loadu_ps(sc + b));
      acc = q8_half_step(ha, hb, la, lb, cv, acc);
    }
  return avx2_tail_q8(r, P, m, acc);
}

// avx2_row_q8 for activation rows m and m + 1 at once, each weight chunk widened once for both:
// each row's instructions and their order are avx2_row_q8's (the same result, bit for bit).
inline void avx2_row2_q8(const uint8_t* row, int64_t K, const Planes16& P, int64_t m,
                         __m256& acc0, __m256& acc1) {
  const Row32 r = row32(QType::Q8_0, row, K);
  const int16_t* p0 = P.q.data() + m * P.row;
  const int16_t* p1 = p0 + P.row;
  const float* s0 = P.scale.data() + m * r.nb;
  const float* s1 = s0 + r.nb;
  acc0 = acc1 = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < P.ngroups; ++gi)
    for (int h = 0; h < 2; ++h) {
      const uint8_t* q = r.qs + gi * kGroup * 32 + 32 * h;
      const int64_t off = (gi * 2 + h) * 8 * 64;
      __m256i ha0 = _mm256_setzero_si256(), hb0 = ha0, la0 = ha0, lb0 = ha0;
      __m256i ha1 = ha0, hb1 = ha0, la1 = ha0, lb1 = ha0;
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const __m256i wa = widen_s8(q + 64 * c), wb = widen_s8(q + 64 * c + 16);
        q8_chunk(wa, wb, p0 + off + c * 64, ha0, hb0, la0, lb0);
        q8_chunk(wa, wb, p1 + off + c * 64, ha1, hb1, la1, lb1);
        XLLM_IN_REGS("+x"(ha0), "+x"(hb0), "+x"(la0), "+x"(lb0), "+x"(ha1), "+x"(hb1), "+x"(la1),
                     "+x"(lb1));
      }
      const int64_t b = gi * kGroup + 8 * h;
      const __m256 d = halves_256(r.d + 2 * b);
      acc0 = q8_half_step(ha0, hb0, la0, lb0, _mm256_mul_ps(d, _mm256_loadu_ps(s0 + b)), acc0);
      acc1 = q8_half_step(ha1, hb1, la1, lb1, _mm256_mul_ps(d, _mm256_loadu_ps(s1 + b)), acc1);
    }
  acc0 = avx2_tail_q8(r, P, m, acc0);
  acc1 = avx2_tail_q8(r, P, m + 1, acc1);
}

void avx2_any_q8(const uint8_t* row, int64_t K, const Planes16& P, int64_t rows, float* y) {
  int64_t m = 0;
  for (; m + 2 <= rows; m += 2) {  // pairs of activation rows (batch steps)
    __m256 a0, a1;
    avx2_row2_q8(row, K, P, m, a0, a1);
    y[m] = avx2_sum(a0);
    y[m + 1] = avx2_sum(a1);
  }
  for (; m < rows; ++m) y[m] = avx2_sum(avx2_row_q8(row, K, P, m));
}

void avx2_4x1_q8(const uint8_t* w, int64_t row_bytes, int64_t K, const Planes16& P, float* y) {
  __m128 q[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) q[i] = fold_256(avx2_row_q8(w + i * row_bytes, K, P, 0));
  _mm_storeu_ps(y, _mm_hadd_ps(_mm_hadd_ps(q[0], q[1]), _mm_hadd_ps(q[2], q[3])));
}

#pragma GCC pop_options
#endif  // XLLM_X86

enum class Isa { Plain, Avx2, Avx512 };

// The integer paths run unless XLLM_QUANT_ACTIVATIONS=fp32 asks for fp32 activations throughout
// (slower; the reference's numbers to the fp32 sums' order).
bool int_activations() {
  static const bool yes = std::string_view(std::getenv("XLLM_QUANT_ACTIVATIONS") ?: "") != "fp32";
  return yes;
}

// The 512-bit integer path runs where the CPU has AVX512-VNNI.
bool has_vnni() {
#ifdef XLLM_X86
  static const bool yes = __builtin_cpu_supports("avx512vnni") && int_activations();
  return yes;
#else
  return false;
#endif
}

// GFNI unpacks the high nibbles in one op (XLLM_GFNI=0 turns it off: the same numbers, bit for bit).
bool has_gfni() {
#ifdef XLLM_X86
  static const bool yes = __builtin_cpu_supports("gfni") &&
                          std::string_view(std::getenv("XLLM_GFNI") ?: "") != "0";
  return yes;
#else
  return false;
#endif
}

Isa isa() {
#ifdef XLLM_X86
  static const Isa chosen = [] {
    const auto cap = at::get_cpu_capability();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return Isa::Avx512;
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::Avx2;
    return Isa::Plain;
  }();
  return chosen;
#else
  return Isa::Plain;
#endif
}

void decode_row(Isa which, const Format& f, const uint8_t* row, int64_t K, float* y) {
#ifdef XLLM_X86
  // AVX512 machines run the AVX2 decoders too (the steps themselves take the fused paths)
  if (which == Isa::Avx512 || which == Isa::Avx2) return decode_row_256(f, row, K, y);
#endif
  decode_row_plain(f, row, K, y);
}

template <int MB>
void dot_rows(Isa which, const float* x, int64_t ldx, const float* w, int64_t K, float* y) {
#ifdef XLLM_X86
  if (which == Isa::Avx512) return dot_rows_512<MB>(x, ldx, w, K, y);
  if (which == Isa::Avx2) return dot_rows_256<MB>(x, ldx, w, K, y);
#endif
  for (int m = 0; m < MB; ++m) y[m] = dot_plain(x + m * ldx, w, K);
}

void dot_any(Isa which, const float* x, int64_t ldx, int64_t rows, const float* w, int64_t K,
             float* y) {
  for (int64_t m0 = 0; m0 < rows; m0 += 4) {
    const float* xm = x + m0 * ldx;
    switch (std::min<int64_t>(rows - m0, 4)) {
      case 4: dot_rows<4>(which, xm, ldx, w, K, y + m0); break;
      case 3: dot_rows<3>(which, xm, ldx, w, K, y + m0); break;
      case 2: dot_rows<2>(which, xm, ldx, w, K, y + m0); break;
      default: dot_rows<1>(which, xm, ldx, w, K, y + m0); break;
    }
  }
}

int64_t in_features(const Format& f, const at::Tensor& qweight) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "xllm::linear_q: qweight must be a contiguous uint8 [N, row_bytes] tensor");
  TORCH_CHECK(qweight.size(1) % f.bytes == 0, "xllm::linear_q: row of ", qweight.size(1),
              " bytes is not whole blocks of ", f.bytes);
  return qweight.size(1) / f.bytes * f.block;
}

// out[M, N] (fp32, row stride N) for M <= kMaxRows activation rows x[M, K] (fp32, contiguous).
void small(const Format& f, const float* x, int64_t M, int64_t K, const uint8_t* w,
           int64_t row_bytes, int64_t N, const float* bias, float* out) {
  const Isa which = isa();
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  // each activation row's sums over its blocks of 32 (the q4_0 / q4_1 offsets' factor; q8_0
  // has no offset and reads none)
  thread_local std::vector<float> sums_tl;  // the calling thread's, kept between calls
  std::vector<float>& sums = sums_tl;
  if (f.block == 32) {
    const int64_t nb = K / 32;
    sums.assign(M * nb + kMaskPad, 0.f);  // zeros past the end, as the planes' scales
    if (f.type != QType::Q8_0) {
#ifdef XLLM_X86
      if (which != Isa::Plain) {
        block_sums_256(x, M * nb, sums.data());
      } else
#endif
        for (int64_t i = 0; i < M * nb; ++i) {
          float s = 0.f;
          for (int j = 0; j < 32; ++j) s += x[32 * i + j];
          sums[i] = s;
        }
    }
  }
#ifdef XLLM_X86
  const bool vnni = which == Isa::Avx512 && has_vnni() && f.block == 32;
  thread_local Planes planes_tl;
  Planes& planes = planes_tl;  // the lambda below runs on other threads: bind this thread's
  // AVX2 (or ATEN_CPU_CAPABILITY=avx2): the integer paths on 256-bit registers (q8_0: Planes16)
  const bool int2 = which == Isa::Avx2 && int_activations() && f.block == 32;
  if (vnni) make_planes(x, M, K, f.type == QType::Q8_0, planes);
  thread_local Planes16 planes16_tl;  // q8_0's
  Planes16& planes16 = planes16_tl;
  const bool q8w = int2 && f.type == QType::Q8_0;
  if (int2 && !q8w) make_planes_256(x, M, K, planes);
  if (q8w) make_planes16(x, M, K, planes16);
  const bool gf = vnni && has_gfni();
#endif
  const std::function<void(int64_t, int64_t)> rows = [&](int64_t n0, int64_t n1) {
    thread_local std::vector<float> wrow;  // a decoded row (the paths that decode into L1)
    wrow.resize(K);
    float y[kMaxRows];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w + n * row_bytes;
#ifdef XLLM_X86
      // ~kPrefetchBytes ahead of the row being multiplied: enough bytes in flight to cover the
      // memory latency at this thread's share of the bandwidth
      const bool four = (vnni || int2) && M == 1 && n + 4 <= n1;
      for (int64_t off = 0; off < (four ? 4 : 1) * row_bytes; off += 64) {
        const int64_t ahead = (n - n0) * row_bytes + off + kPrefetchBytes;
        if (ahead < (n1 - n0) * row_bytes)
          _mm_prefetch(reinterpret_cast<const char*>(w + n0 * row_bytes + ahead), _MM_HINT_T0);
      }
      if (four) {  // four rows of a batch-1 step
        float y4[4];
        if (q8w)
          avx2_4x1_q8(row, row_bytes, K, planes16, y4);
        else if (int2)
          (f.type == QType::Q4_1 ? avx2_4x1<QType::Q4_1> : avx2_4x1<QType::Q4_0>)(
              row, row_bytes, K, planes, sums.data(), y4);
        else if (f.type == QType::Q4_1)
          (gf ? vnni_4x1<QType::Q4_1, true> : vnni_4x1<QType::Q4_1, false>)(
              row, row_bytes, K, planes, sums.data(), y4);
        else if (f.type == QType::Q4_0)
          (gf ? vnni_4x1<QType::Q4_0, true> : vnni_4x1<QType::Q4_0, false>)(
              row, row_bytes, K, planes, sums.data(), y4);
        else
          vnni_4x1<QType::Q8_0, false>(row, row_bytes, K, planes, sums.data(), y4);
        for (int i = 0; i < 4; ++i) out[n + i] = y4[i] + (bias ? bias[n + i] : 0.f);
        n += 3;
        continue;
      }
#endif
#ifdef XLLM_X86
      if (q8w) {
        avx2_any_q8(row, K, planes16, M, y);
      } else if (int2) {
        (f.type == QType::Q4_1 ? avx2_any<QType::Q4_1> : avx2_any<QType::Q4_0>)(
            row, K, planes, sums.data(), M, y);
      } else if (vnni && f.type == QType::Q4_1) {
        (gf ? vnni_any<QType::Q4_1, true> : vnni_any<QType::Q4_1, false>)(
            row, K, planes, sums.data(), M, y);
      } else if (vnni && f.type == QType::Q4_0) {
        (gf ? vnni_any<QType::Q4_0, true> : vnni_any<QType::Q4_0, false>)(
            row, K, planes, sums.data(), M, y);
      } else if (vnni) {
        vnni_any<QType::Q8_0, false>(row, K, planes, sums.data(), M, y);
      } else if (!(which == Isa::Avx512 && fused_512(f, row, K, x, sums.data(), M, y)))
#endif
      {
        decode_row(which, f, row, K, wrow.data());
        dot_any(which, x, K, M, wrow.data(), K, y);
      }
      const float b = bias ? bias[n] : 0.f;
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = y[m] + b;
    }
  };
  // inside a CpuProgram replay: its pool's threads, which may hold the head of their rows
  if (!xllm_pool_linear(w, row_bytes, N, grain, M, rows)) xllm_parallel_for(N, grain, rows);
}

// y[M, N] = x[M, K] @ dequant(W)^T (+ bias) for prefill sizes: each thread decodes its own rows of
// W into its buffer (kept between calls) and multiplies them by a one-thread GEMM inside the
// parallel region (oneDNN's, xllm_dense_linear). SmolLM2's shapes, 128 tokens, 2 threads (Zen 5):
// 295-362 GFLOP/s, against ~300 decoding the whole W first and running the GEMM on both threads
// (the decoded W went through L3 between two parallel regions) and 139-161 with ATen's GEMM;
// tiles of 128 KB-1 MB, a GEMM per tile in L2, were slower (164-270: oneDNN wants the long N).
void per_thread_prefill(const Format& f, const at::Tensor& x, const at::Tensor& qweight, int64_t K,
                        const float* bias, float* y) {
  const int64_t M = x.size(0), N = qweight.size(0), row_bytes = qweight.size(1);
  const uint8_t* src = qweight.const_data_ptr<uint8_t>();
  const Isa which = isa();
  xllm_parallel_for(N, 16, [&](int64_t n0, int64_t n1) {
    const int64_t nt = n1 - n0;
    thread_local at::Tensor buffer;
    if (!buffer.defined() || buffer.numel() < nt * K) buffer = at::empty({nt * K}, at::kFloat);
    float* w = buffer.data_ptr<float>();
    for (int64_t i = 0; i < nt; ++i) decode_row(which, f, src + (n0 + i) * row_bytes, K, w + i * K);
    const at::Tensor yt = xllm_dense_linear(x, buffer.narrow(0, 0, nt * K).view({nt, K}), std::nullopt);
    const float* yp = yt.const_data_ptr<float>();  // [M, nt]
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nt; ++j) y[m * N + n0 + j] = yp[m * nt + j] + (bias ? bias[n0 + j] : 0.f);
  });
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

at::Tensor& linear_q_out(const at::Tensor& x, const at::Tensor& qweight, c10::string_view qtype,
                         const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const Format f = format_of(std::string_view(qtype.data(), qtype.size()));
  const int64_t K = in_features(f, qweight), N = qweight.size(0);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "xllm::linear_q: x has ", x.size(-1),
              " features, the weight ", K);
  const auto shape = out_shape(x, N);
  if (out.sizes() != at::IntArrayRef(shape)) out.resize_(shape);
  const int64_t M = K ? x.numel() / K : 0;
  if (M == 0) return out;
  if (M > kMaxRows) {
    const at::Tensor x2 = x.reshape({M, K}).to(at::kFloat).contiguous();
    const at::Tensor b2 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
    at::Tensor y = direct ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
    per_thread_prefill(f, x2, qweight, K, bias ? b2.const_data_ptr<float>() : nullptr, y.data_ptr<float>());
    if (!direct) out.view({M, N}).copy_(y.view({M, N}));
    return out;
  }
  // fp32 contiguous operands (a step's usual case) are read in place: no tensor is made
  const bool fp32_in = x.scalar_type() == at::kFloat && x.is_contiguous();
  at::Tensor xf = fp32_in ? at::Tensor() : x.reshape({M, K}).to(at::kFloat).contiguous();
  const bool fp32_bias = !bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous());
  at::Tensor bf = fp32_bias ? at::Tensor() : bias->to(at::kFloat).contiguous();
  const float* bp = !bias ? nullptr : fp32_bias ? bias->const_data_ptr<float>() : bf.const_data_ptr<float>();
  const bool direct = out.scalar_type() == at::kFloat && out.is_contiguous();
  at::Tensor y = direct ? at::Tensor() : at::empty({M, N}, x.options().dtype(at::kFloat));
  small(f, fp32_in ? x.const_data_ptr<float>() : xf.const_data_ptr<float>(), M, K,
        qweight.const_data_ptr<uint8_t>(), qweight.size(1), N, bp,
        direct ? out.data_ptr<float>() : y.data_ptr<float>());
  if (!direct) out.view({M, N}).copy_(y);
  return out;
}

at::Tensor linear_q(const at::Tensor& x, const at::Tensor& qweight, c10::string_view qtype,
                    const std::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty(out_shape(x, qweight.size(0)), x.options());
  return linear_q_out(x, qweight, qtype, bias, out);
}

}  // namespace

namespace xllm_direct {  // xllm_ops.h

at::Tensor& linear_q_out(const at::Tensor& x, const at::Tensor& qweight, c10::string_view qtype,
                         const std::optional<at::Tensor>& bias, at::Tensor& out) {
  return ::linear_q_out(x, qweight, qtype, bias, out);
}

}  // namespace xllm_direct

TORCH_LIBRARY_IMPL(xllm, CPU, m) {
  m.impl("linear_q", &linear_q);
  m.impl("linear_q.out", &linear_q_out);
}

TORCH_LIBRARY_FRAGMENT(xllm, m) {
  // the third-digit rule's ratio (Planes::low): sets it when ratio >= 0, returns the one before
  m.def("linear_q_low_digits(float ratio=-1.0) -> float", [](double ratio) {
    const float before = kLowDigitRatio.load();
    if (ratio >= 0) kLowDigitRatio.store(static_cast<float>(ratio));
    return static_cast<double>(before);
  });
}
