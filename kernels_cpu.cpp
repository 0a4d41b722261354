// kernels_cpu.cpp: the small steps of a decoder layer, fused, for the CPU.
//
// Why this file exists. On the CPU a float32 decode step of the default model spends ~19-20 ms
// in its 121 matmuls (they stream every weight from memory) and, from Python, ~5 ms around them:
// RMS norms, RoPE, writing K and V into the cache, SiLU(gate) * up, the reshapes, and the Python
// calls themselves. Each of those steps is a handful of PyTorch ops on a few hundred numbers,
// where the cost is the call, not the math (F.rms_norm alone takes ~10 us). Here each step is one
// loop over the numbers, and `Stack` runs all the layers in one call from Python.
//
// kernels.py compiles this file once (torch.utils.cpp_extension.load, ~30 s). Block.forward is
// the same layer written in PyTorch ops: read that one first, it is the reference; tests check
// that Block.forward_fused (layer by layer, small steps from here) and Stack agree with it.
// Rounding follows the PyTorch ops: float accumulation, a round to the tensor's dtype where
// PyTorch would store an intermediate tensor (bfloat16 gives what the eager layer gives).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// rows of the [R, C] tensor at x, each normalised by its root mean square and scaled by w
template <typename T>
void rms_rows(const T* x, const T* w, T* out, int64_t R, int64_t C, float eps) {
  for (int64_t r = 0; r < R; r++, x += C, out += C) {
    float sum = 0.f;
    for (int64_t i = 0; i < C; i++) sum += float(x[i]) * float(x[i]);
    const float scale = 1.0f / std::sqrt(sum / C + eps);
    for (int64_t i = 0; i < C; i++) out[i] = T(float(x[i]) * scale * float(w[i]));  // as F.rms_norm
  }
}

// one head vector of D numbers, rotated as HF's Llama checkpoints do: the two halves of the
// vector are the two coordinates of D/2 rotating pairs. sin has its first half negated (see
// kernels.apply_rope), so out = x * cos + [x2, x1] * sin.
template <typename T>
void rope_row(const T* x, const T* cos, const T* sin, T* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; i++) {
    const int64_t j = i < half ? i + half : i - half;
    out[i] = T(float(T(float(x[i]) * float(cos[i]))) + float(x[j]) * float(sin[i]));
  }
}

int64_t grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

}  // namespace

// y = rms_norm(x) * w over the last dimension, any leading shape.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  x = x.contiguous();
  auto out = torch::empty_like(x);
  const int64_t C = x.size(-1), R = x.numel() / C;
  TORCH_CHECK(w.numel() == C && w.scalar_type() == x.scalar_type(), "rms_norm: weight mismatch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain(C), [&](int64_t r0, int64_t r1) {  // long prefills only
      rms_rows(xp + r0 * C, wp, op + r0 * C, r1 - r0, C, float(eps));
    });
  });
  return out;
}

// The attention half of a layer up to SDPA, for qkv = wqkv(x) of shape (B, T, H + 2 Hk, D):
//   q, k <- rms_norm(q) * q_norm, rms_norm(k) * k_norm     (Qwen3 only: when q_norm is given)
//   q, k <- RoPE(q), RoPE(k) with cos, sin (B, T, 1, D)
//   k_cache[b, slots[b, t]], v_cache[b, slots[b, t]] <- k, v   (caches (B, S, Hk, D))
// and returns q in the grouped layout SDPA gets in kernels.KVCache.attend: (B, Hk, T * G, D),
// where the G = H / Hk query heads of KV head hk are heads hk * G .. hk * G + G - 1.
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                         torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots,
                         int64_t H, int64_t Hk, std::optional<torch::Tensor> q_norm,
                         std::optional<torch::Tensor> k_norm, double eps) {
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(3), S = k_cache.size(1);
  const int64_t G = H / Hk;
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(2) == H + 2 * Hk && H % Hk == 0, "rope_store: qkv shape");
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() &&
              k_cache.is_contiguous() && v_cache.is_contiguous(), "rope_store: not contiguous");
  TORCH_CHECK(cos.numel() == B * T * D && sin.numel() == B * T * D, "rope_store: cos/sin shape");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == Hk && k_cache.size(3) == D,
              "rope_store: cache shape");
  auto dt = qkv.scalar_type();
  TORCH_CHECK(cos.scalar_type() == dt && k_cache.scalar_type() == dt && v_cache.scalar_type() == dt,
              "rope_store: dtype mismatch");
  auto slot = slots.to(torch::kLong).contiguous();
  TORCH_CHECK(slot.numel() == B * T, "rope_store: slots shape");
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; i++)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "KV cache overflow: slot ", sp[i], " of ", S);
  auto q = torch::empty({B, Hk, T * G, D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rope_store", [&] {
    const scalar_t *src = qkv.data_ptr<scalar_t>(), *cp = cos.data_ptr<scalar_t>(),
                   *snp = sin.data_ptr<scalar_t>();
    const scalar_t* qn = q_norm ? q_norm->data_ptr<scalar_t>() : nullptr;
    const scalar_t* kn = k_norm ? k_norm->data_ptr<scalar_t>() : nullptr;
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k_cache.data_ptr<scalar_t>(),
             *vp = v_cache.data_ptr<scalar_t>();
    std::vector<scalar_t> normed(D);
    // a head: normalised first when its norm weight is given, then rotated into `out`
    auto head = [&](const scalar_t* x, const scalar_t* w, const scalar_t* c, const scalar_t* s,
                    scalar_t* out) {
      if (w) {
        rms_rows(x, w, normed.data(), 1, D, float(eps));
        x = normed.data();
      }
      rope_row(x, c, s, out, D);
    };
    for (int64_t b = 0; b < B; b++) {
      for (int64_t t = 0; t < T; t++) {
        const int64_t bt = b * T + t;
        const scalar_t* row = src + bt * (H + 2 * Hk) * D;  // q heads, k heads, v heads
        const scalar_t *c = cp + bt * D, *s = snp + bt * D;
        for (int64_t h = 0; h < H; h++)
          head(row + h * D, qn, c, s, qp + ((b * Hk + h / G) * T * G + t * G + h % G) * D);
        const int64_t at = (b * S + sp[bt]) * Hk * D;  // this token's place in the cache
        for (int64_t h = 0; h < Hk; h++) {
          head(row + (H + h) * D, kn, c, s, kp + at + h * D);
          const scalar_t* v = row + (H + Hk + h) * D;
          std::copy(v, v + D, vp + at + h * D);
        }
      }
    }
  });
  return q;
}

// SiLU(gate) * up for gu = w13(x) = [gate, up] along the last dimension.
torch::Tensor silu_mul(torch::Tensor gu) {
  gu = gu.contiguous();
  const int64_t I = gu.size(-1) / 2, R = gu.numel() / gu.size(-1);
  auto sizes = gu.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* g = gu.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain(I), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < I; i++) {
          const float a = float(g[r * 2 * I + i]);
          o[r * I + i] = scalar_t(float(scalar_t(a / (1.0f + std::exp(-a)))) *
                                  float(g[r * 2 * I + I + i]));
        }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Attention for the few query rows of a decode or tree step. torch's CPU SDPA runs two small
// GEMM calls per KV head (q k^T, then p v): for one token that is 180 calls of a few microseconds
// a forward of the default model, ~15% of an int4 draft step, for ~0.2 M multiply-adds per
// layer. Here the same sums are plain loops over the cache: per KV head, the R = T * G query
// rows' scores against each key, softmax(scores * scale + bias) per row, then the weighted sum
// of the values. Same math as SDPA (its rounding differs, at float32's last bits).

namespace {

// one KV head: q (R, D), keys/values at k, v with a stride of ks between slots, bias (R, S)
// (-inf: a slot the query does not see) -> out (R, D); w: R * S scratch.
// The plain loops; attend_head_avx512 below is the same, vectorized.
void attend_head(const float* q, const float* k, const float* v, int64_t ks, const float* bias,
                 float* out, float* w, int64_t R, int64_t S, int64_t D, float scale) {
  for (int64_t r = 0; r < R; r++) {
    float* wr = w + r * S;
    float top = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < S; s++) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; d++) dot += q[r * D + d] * k[s * ks + d];
      wr[s] = dot * scale + bias[r * S + s];
      top = std::max(top, wr[s]);
    }
    for (int64_t s = 0; s < S; s++) {  // a row that sees no slot gives NaN, as SDPA does
      wr[s] = std::exp(wr[s] - top);
      sum += wr[s];
    }
    float* o = out + r * D;
    std::fill(o, o + D, 0.f);
    for (int64_t s = 0; s < S; s++) {
      if (wr[s] == 0.f) continue;  // a masked slot (tree steps mask most of the scratch)
      const float p = wr[s] / sum;
      for (int64_t d = 0; d < D; d++) o[d] += p * v[s * ks + d];
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ATTN_TARGET __attribute__((target("avx512f")))

// e^x for 16 floats x <= 0 (scores minus their row's maximum): 2^n e^r with n = round(x / ln 2)
// and |r| <= ln 2 / 2, e^r by its Taylor series to r^6 (error < 2e-7 relative); e^x below
// e^-87 (and e^-inf, a masked slot) is 0.
ATTN_TARGET inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);   // ln 2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);        // and the rest
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(seen, _mm512_scalef_ps(p, n));
}

// attend_head for D a multiple of 16 (up to 128): a query row's D numbers sit in registers
ATTN_TARGET void attend_head_avx512(const float* q, const float* k, const float* v, int64_t ks,
                                    const float* bias, float* out, float* w, int64_t R,
                                    int64_t S, int64_t D, float scale) {
  const int64_t V = D / 16;
  for (int64_t r = 0; r < R; r++) {
    __m512 qr[8], acc[8];
    for (int64_t j = 0; j < V; j++) qr[j] = _mm512_loadu_ps(q + r * D + 16 * j);
    float* wr = w + r * S;
    float top = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
      __m512 dot = _mm512_mul_ps(qr[0], _mm512_loadu_ps(k + s * ks));
      for (int64_t j = 1; j < V; j++) dot = _mm512_fmadd_ps(qr[j], _mm512_loadu_ps(k + s * ks + 16 * j), dot);
      wr[s] = _mm512_reduce_add_ps(dot) * scale + bias[r * S + s];
      top = std::max(top, wr[s]);
    }
    __m512 total = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(wr + s), _mm512_set1_ps(top)));
      _mm512_storeu_ps(wr + s, e);
      total = _mm512_add_ps(total, e);
    }
    if (s < S) {
      const __mmask16 tail = (__mmask16)((1u << (S - s)) - 1);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, wr + s), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(wr + s, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    const float inv = 1.f / _mm512_reduce_add_ps(total);  // a row that sees nothing: NaN, as SDPA
    for (int64_t j = 0; j < V; j++) acc[j] = _mm512_setzero_ps();
    for (s = 0; s < S; s++) {
      if (wr[s] == 0.f) continue;  // a masked slot (tree steps mask most of the scratch)
      const __m512 p = _mm512_set1_ps(wr[s]);
      for (int64_t j = 0; j < V; j++) acc[j] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + s * ks + 16 * j), acc[j]);
    }
    for (int64_t j = 0; j < V; j++) _mm512_storeu_ps(out + r * D + 16 * j, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
  }
}
bool attend_avx512(int64_t D) {
  static const bool cpu = __builtin_cpu_supports("avx512f");
  return cpu && D % 16 == 0 && D <= 128;
}
#else
void attend_head_avx512(const float*, const float*, const float*, int64_t, const float*, float*,
                        float*, int64_t, int64_t, int64_t, float) {}
bool attend_avx512(int64_t) { return false; }
#endif

}  // namespace

// SDPA's call in Stack::forward: q (B, Hk, R, D), the layer's caches (B, S_max, Hk, D) read up to
// slot S, bias (B, 1, R, S) -> (B, Hk, R, D). float32 with few query rows (R <= 32) here, any
// other call in torch's SDPA.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& bias, int64_t S) {
  const int64_t B = q.size(0), Hk = q.size(1), R = q.size(2), D = q.size(3);
  if (q.scalar_type() != at::kFloat || R > 32 || !bias.defined() ||
      bias.scalar_type() != at::kFloat || bias.size(-1) != S || !q.is_contiguous() ||
      !k_cache.is_contiguous() || !v_cache.is_contiguous())
    return at::scaled_dot_product_attention(q, k_cache.narrow(1, 0, S).transpose(1, 2),
                                            v_cache.narrow(1, 0, S).transpose(1, 2), bias);
  auto b = bias.expand({B, 1, R, S}).contiguous();
  auto out = torch::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(),
              *vp = v_cache.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t S_max = k_cache.size(1), ks = Hk * D;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const bool fast = attend_avx512(D);
  // ~1 M multiply-adds before a second thread pays for waking it
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(2 * R * S * D, 1));
  at::parallel_for(0, B * Hk, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> w(R * S);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t bi = i / Hk, h = i % Hk;
      const int64_t at = bi * S_max * ks + h * D;  // slot 0 of this row and head
      (fast ? attend_head_avx512 : attend_head)(qp + i * R * D, kp + at, vp + at, ks,
                                                bp + bi * R * S, op + i * R * D, w.data(), R,
                                                S, D, scale);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// The whole stack of decoder layers in one call. From Python, a layer costs ~15 calls into
// torch whose overhead (~100 us a layer, ~3 ms a step) is as large as the small steps were;
// here the same calls are made from C++. The matmuls are the very kernels Python would run:
// kernels.py hands over, per linear, the kind and tensors PackedLinear (or drafts.Int4Linear)
// chose for this dtype.

enum Kind : int64_t { PLAIN = 0, ONEDNN_PACKED = 1, INT4 = 2, INT4_BF16 = 3 };

// ---------------------------------------------------------------------------------------------
// int4 weights x bfloat16 activations, for the int4 drafts (drafts.Int4Linear). torch's CPU int4
// kernel converts each weight to float before its multiply, so a draft step is bound by that
// arithmetic, not by reading the 4-bit weights. Here 32 weights become bfloat16 in three
// integer instructions, and one AVX512-BF16 dot product multiplies 32 pairs with the
// activations, accumulating in float32 (products of two bfloat16 are exact in float32). At one
// row a step is bound by reading the weights, so each group's scale d and minimum m are stored
// in float16 (a GGUF's own precision; in float32 they were a third of the bytes read).
// The trick: a bfloat16 whose bits are 0x4300 | q is exactly 128 + q for a 4-bit q, so per
// group of 32 inputs  sum_i (d q_i + m) x_i = d S + (m - 128 d) sum_i x_i,  S = sum_i (128 + q_i)
// x_i. Layout (int4_pack in kernels_cpu.py): per block of 16 output channels, 32 bytes per 4
// inputs 4j..4j+3; byte 2c + h holds q[c, 4j + h] (low nibble) and q[c, 4j + 2 + h] (high), so
// the low nibbles of the 32 bytes are the pairs (q[c, 4j], q[c, 4j + 1]) of channels c = 0..15
// in the 32-bit lanes a dot product wants, and the high nibbles the next pair.
#if defined(__GNUC__) && defined(__x86_64__)
#define INT4_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

template <int R>
INT4_TARGET void int4_block(const uint8_t* w, const at::Half* dz, const uint16_t* x, const float* sx,
                            float* y, int64_t K, int64_t N) {
  const int64_t G = K / 32;
  const __m512i low = _mm512_set1_epi16(0x000F), one28 = _mm512_set1_epi16(0x4300);
  __m512 total[R];
  for (int r = 0; r < R; r++) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t jj = 0; jj < 8; jj++) {
      const int64_t j = g * 8 + jj;
      const __m512i words = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 32)));
      const __m512i a = _mm512_ternarylogic_epi32(words, low, one28, 0xEA);  // (w & 15) | 0x4300
      const __m512i b = _mm512_or_si512(_mm512_srli_epi16(words, 4), one28);
      for (int r = 0; r < R; r++) {
        const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + r * K + 4 * j);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)a, (__m512bh)_mm512_set1_epi32(xr[0]));
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)b, (__m512bh)_mm512_set1_epi32(xr[1]));
      }
    }
    const auto* h = reinterpret_cast<const __m256i*>(dz + g * 32);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(h));
    const __m512 m = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), d, _mm512_cvtph_ps(_mm256_loadu_si256(h + 1)));
    for (int r = 0; r < R; r++) {
      total[r] = _mm512_fmadd_ps(acc[r], d, total[r]);
      total[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * G + g]), total[r]);
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * N, total[r]);
}

// float32 x -> its bfloat16 copy (rounded to nearest even, as c10::BFloat16 rounds a finite
// number) and the sum of each group of 32 of those bfloat16 numbers: 32 numbers per step
INT4_TARGET void int4_input(const float* x, uint16_t* xb, float* sums, int64_t groups) {
  for (int64_t g = 0; g < groups; g++, x += 32, xb += 32) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + 16), _mm512_loadu_ps(x));
    _mm512_storeu_si512(xb, (__m512i)b);
    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16)));
    sums[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)),
                                                 _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16))));
  }
}

INT4_TARGET void int4_rows(const uint8_t* w, const at::Half* dz, const uint16_t* x, const float* sx,
                           float* y, int64_t R, int64_t K, int64_t N) {
  switch (R) {
    case 1: return int4_block<1>(w, dz, x, sx, y, K, N);
    case 2: return int4_block<2>(w, dz, x, sx, y, K, N);
    case 3: return int4_block<3>(w, dz, x, sx, y, K, N);
    case 4: return int4_block<4>(w, dz, x, sx, y, K, N);
    case 5: return int4_block<5>(w, dz, x, sx, y, K, N);
    case 6: return int4_block<6>(w, dz, x, sx, y, K, N);
    case 7: return int4_block<7>(w, dz, x, sx, y, K, N);
    default: return int4_block<8>(w, dz, x, sx, y, K, N);
  }
}

}  // namespace

bool int4_supported() { return __builtin_cpu_supports("avx512bf16"); }

// x (M, K) any float dtype, read as bfloat16 (rounded as .to(bfloat16) rounds), w (N/16, K/4,
// 32) uint8 and dz (N/16, K/32, 2, 16) float16 (d, then m) from int4_pack -> x w^T
// (M, N) float32. The bf16 copy of x and its group sums are made here: as torch ops they were
// ~4 small calls per linear, about a tenth of a draft step.
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dz) {
  TORCH_CHECK(int4_supported(), "int4_mm needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2, "int4_mm: x must be (M, K)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * 16, G = K / 32;
  TORCH_CHECK(K % 32 == 0 && w.size(1) * 4 == K && w.size(2) == 32 && dz.size(0) * 16 == N &&
              dz.size(1) == G && dz.scalar_type() == at::kHalf && w.is_contiguous() &&
              dz.is_contiguous(), "int4_mm: shapes");
  std::vector<uint16_t> xb(M * K);
  std::vector<float> sx(M * G, 0.f);
  auto xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    int4_input(xc.data_ptr<float>(), xb.data(), sx.data(), M * G);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "int4_mm", [&] {
      const scalar_t* p = xc.data_ptr<scalar_t>();
      for (int64_t i = 0; i < M * K; i++) {
        const c10::BFloat16 v(static_cast<float>(p[i]));
        xb[i] = v.x;
        sx[i / 32] += static_cast<float>(v);   // row r, group g: i / 32 == r * G + g
      }
    });
  }
  auto y = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const at::Half* dp = dz.data_ptr<at::Half>();
  const uint16_t* xp = xb.data();
  const float* sp = sx.data();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / 16, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; nb++)
      for (int64_t r0 = 0; r0 < M; r0 += 8)
        int4_rows(wp + nb * K * 8, dp + nb * G * 32, xp + r0 * K, sp + r0 * G, yp + r0 * N + nb * 16,
                  std::min<int64_t>(8, M - r0), K, N);
  });
  return y;
}
#else
bool int4_supported() { return false; }
torch::Tensor int4_mm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& dz) {
  TORCH_CHECK(false, "int4_mm needs an x86-64 CPU with AVX512-BF16");
}
#endif

at::Tensor run_linear(const at::Tensor& x, int64_t kind, int64_t param, const at::Tensor& a,
                      const at::Tensor& b, const at::Tensor& bias) {
  auto x2 = x.reshape({-1, x.size(-1)});
  std::optional<at::Tensor> bo;
  if (bias.numel()) bo = bias;
  at::Tensor y;
  switch (kind) {
    case PLAIN:  // a = weight
      y = at::linear(x2, a, bo);
      break;
    case ONEDNN_PACKED: {  // a = oneDNN-packed weight
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
      y = op.call(x2, a, bo, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
      break;
    }
    case INT4:  // a = int4-packed weight, b = scales and zeros, param = group size
      y = at::_weight_int4pack_mm_for_cpu(x2.to(b.scalar_type()), a, param, b).to(x.scalar_type());
      if (bo) y = y + *bo;
      break;
    case INT4_BF16:  // a, b = int4_mm's w and dz
      y = int4_mm(x2, a, b).to(x.scalar_type());
      if (bo) y = y + *bo;
      break;
    default:
      TORCH_CHECK(false, "unknown linear kind ", kind);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = y.size(-1);
  return y.view(sizes);
}

// Per layer: 16 tensors [attn_norm, q_norm, k_norm, mlp_norm, then (a, b, bias) for wqkv, wo,
// w13, w2] (empty tensors where there is none) and 8 ints (kind, param) for the 4 linears.
struct Stack {
  std::vector<at::Tensor> t;
  std::vector<int64_t> kinds;
  int64_t H, Hk;
  double eps;

  Stack(std::vector<at::Tensor> t, std::vector<int64_t> kinds, int64_t H, int64_t Hk, double eps)
      : t(std::move(t)), kinds(std::move(kinds)), H(H), Hk(Hk), eps(eps) {
    TORCH_CHECK(this->t.size() % 16 == 0 && this->kinds.size() * 2 == this->t.size(),
                "Stack: 16 tensors and 8 ints per layer");
  }

  // kernels.Block.forward_fused for every layer in turn: x (B, T, C) -> (B, T, C)
  at::Tensor forward(at::Tensor x, const at::Tensor& k_caches, const at::Tensor& v_caches,
                     const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& mask, int64_t S) {
    const int64_t B = x.size(0), T = x.size(1), D = k_caches.size(-1), G = H / Hk;
    const int64_t layers = t.size() / 16;
    TORCH_CHECK(k_caches.size(0) == layers, "Stack: the cache has another number of layers");
    for (int64_t l = 0; l < layers; l++) {
      const at::Tensor* p = &t[l * 16];
      const int64_t* k = &kinds[l * 8];
      auto lin = [&](const at::Tensor& in, int i) {
        return run_linear(in, k[2 * i], k[2 * i + 1], p[4 + 3 * i], p[5 + 3 * i], p[6 + 3 * i]);
      };
      auto opt = [](const at::Tensor& w) {
        return w.numel() ? std::optional<at::Tensor>(w) : std::nullopt;
      };
      auto qkv = lin(rms_norm(x, p[0], eps), 0).view({B, T, H + 2 * Hk, D});
      auto k_cache = k_caches[l], v_cache = v_caches[l];
      auto q = rope_store(qkv, cos, sin, k_cache, v_cache, slots, H, Hk, opt(p[1]), opt(p[2]), eps);
      auto y = attend(q, k_cache, v_cache, mask, S);
      x = x + lin(y.view({B, Hk, T, G, D}).transpose(1, 2).reshape({B, T, H * D}), 1);
      x = x + lin(silu_mul(lin(rms_norm(x, p[3], eps), 2)), 3);
    }
    return x;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Stack>(m, "Stack")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, double>())
      .def("forward", &Stack::forward);
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * w over the last dimension");
  m.def("rope_store", &rope_store, "q/k norm, RoPE, K/V into the cache; q grouped for SDPA");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up");
  m.def("attend", &attend, "softmax(q k^T / sqrt(D) + bias) v over a layer's cache (SDPA's call)");
  m.def("int4_mm", &int4_mm, "int4 weights (int4_pack) x bfloat16 activations, float32 out");
  m.def("int4_supported", &int4_supported, "whether this CPU runs int4_mm (AVX512-BF16)");
}
