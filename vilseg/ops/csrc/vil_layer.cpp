// Fused CPU operators of the ViL layer's inner part: the element-wise chains around the mLSTM kernel, each one pass
// over the tokens (forward and backward), where PyTorch operators make several passes over tile-sized temporaries.
// Written here because no library ships them: PyTorch fuses them only through torch.compile.
// All tensors are channels-last token rows (..., C) with unit channel stride; float32 and float64.
#include "native_common.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <vector>

namespace {

using namespace vilseg_native;

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, name, " must be (B, S, C) with unit channel stride, got sizes ",
              x.sizes(), " strides ", x.strides());
}

// An output the caller may give: `given`, a view with unit channel stride (e.g. of a larger buffer, written through
// its strides), checked to be `sizes` of `like`'s dtype (else: `name` and `expected` in the error); or a new tensor.
at::Tensor given_or_new(const c10::optional<at::Tensor>& given, at::IntArrayRef sizes, const at::Tensor& like,
                        const char* name, const char* expected) {
  if (!given) return at::empty(sizes, like.options());
  check_rows(*given, name);
  TORCH_CHECK(given->sizes() == sizes && given->scalar_type() == like.scalar_type(), name, " must be ", expected);
  return *given;
}

// A parameter read through its raw pointer: undefined, or a contiguous vector of n elements of the data's dtype.
void check_vector(const c10::optional<at::Tensor>& t, int64_t n, at::ScalarType type, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->is_contiguous() && t->numel() == n && t->scalar_type() == type, name,
              " must be a contiguous vector of ", n, " elements of type ", type);
}

// Calls fn(tap, token) for each of the k x k taps of the convolution at grid position (r, c) whose input lies inside
// the grid (zero padding elsewhere): tap = i * k + j, token = the input's row-major index.
template <typename F>
inline void for_each_tap(int64_t r, int64_t c, int64_t K, int64_t grid_rows, int64_t grid_cols, F&& fn) {
  const int64_t P = K / 2;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t rr = r + i - P;
    if (rr < 0 || rr >= grid_rows) continue;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t cc = c + j - P;
      if (cc < 0 || cc >= grid_cols) continue;
      fn(i * K + j, rr * grid_cols + cc);
    }
  }
}

// The convolution's pre-activation at grid position (r, c): pre = bias + sum over the taps of w[tap] * x[token], x the
// batch's first token (token stride xt), w (k * k, C) (forward, and backward's recompute).
template <typename scalar_t>
inline void conv_pre_activation(scalar_t* __restrict__ pre, const scalar_t* x, int64_t xt, const scalar_t* w,
                                const scalar_t* bias, int64_t C, int64_t K, int64_t grid_rows, int64_t grid_cols,
                                int64_t r, int64_t c) {
  #pragma omp simd
  for (int64_t ch = 0; ch < C; ++ch) pre[ch] = bias ? bias[ch] : scalar_t(0);
  for_each_tap(r, c, K, grid_rows, grid_cols, [&](int64_t tap, int64_t token) {
    const scalar_t* __restrict__ xr = x + token * xt;
    const scalar_t* __restrict__ wr = w + tap * C;
    #pragma omp simd
    for (int64_t ch = 0; ch < C; ++ch) pre[ch] += wr[ch] * xr[ch];
  });
}

#if defined(__AVX512F__)
// The float32 AVX-512 forms of the 3 x 3 grid convolution's operators for channels in whole registers: a block of
// tokens at a time, and within it one register of channels across all the block's tokens, so that the nine taps'
// weights (and in backward their gradient sums) stay in registers instead of being read and written per token and
// tap. The taps of each token are pointers, those outside the grid to a row of zeros (no branches per tap).
constexpr int kTaps = 9;
constexpr int64_t kConvBlock = 32;  // tokens per block: their rows and halo stay in L2 across the channel registers

// exp_ (native_common.h) on a register: the same range reduction and polynomial
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round), round);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(e, _mm512_castsi512_ps(bits));
}

inline __m512 sigmoid512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// The inputs of output token (r, c) at each tap (row-major over the 3 x 3 window): its rows in x (batch b's first
// token at xb, token stride xt) or `zeros`.
inline void conv_tap_rows(const float** taps, const float* xb, int64_t xt, const float* zeros, int64_t r, int64_t c,
                          int64_t grid_rows, int64_t grid_cols) {
  for (int i = 0; i < 3; ++i) {
    const int64_t rr = r + i - 1;
    for (int j = 0; j < 3; ++j) {
      const int64_t cc = c + j - 1;
      taps[i * 3 + j] = (rr < 0 || rr >= grid_rows || cc < 0 || cc >= grid_cols)
                            ? zeros : xb + (rr * grid_cols + cc) * xt;
    }
  }
}

// The grid of a call of the register form, and the row of C zeros that taps outside it read.
struct ConvGeometry {
  ConvGeometry(int64_t T_, int64_t C_, int64_t grid_rows_, int64_t grid_cols_, int64_t row0_, int64_t rows_)
      : T(T_), C(C_), grid_rows(grid_rows_), grid_cols(grid_cols_), row0(row0_), rows(rows_), zero_row(C_, 0.0f) {}
  // whether the register form serves a k x k kernel over C channels: 3 x 3, channels in whole registers
  static bool fits(int64_t K, int64_t C) { return K == 3 && C % 16 == 0; }
  int64_t T, C, grid_rows, grid_cols, row0, rows;
  std::vector<float> zero_row;
  const float* zeros() const { return zero_row.data(); }
};

// conv_tap_rows for the n own-row tokens from idx = blk on (idx = b T + t)
inline void conv_block_taps(const float* (*taps)[kTaps], const ConvGeometry& G, const float* xp, int64_t xb,
                            int64_t xt, int64_t blk, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t idx = blk + i, b = idx / G.T, t = idx % G.T;
    conv_tap_rows(taps[i], xp + b * xb, xt, G.zeros(), G.row0 + t / G.grid_cols, t % G.grid_cols, G.grid_rows,
                  G.grid_cols);
  }
}

// b0 + the sum over the taps of w * rows[tap] for one register of channels (at c0): a pre-activation, or
// (backward) an input's gradient from its readers' dpre
inline __m512 tap_sum512(const __m512* w, const float* const* rows, int64_t c0, __m512 b0) {
  for (int k = 0; k < kTaps; ++k) b0 = _mm512_fmadd_ps(w[k], _mm512_loadu_ps(rows[k] + c0), b0);
  return b0;
}

// out[idx] = SiLU(bias + sum over the taps of w * x) for the tokens [begin, end) of the own rows (idx = b T + t);
// wt (9, C), bias or null
void conv_silu_forward_avx512(const ConvGeometry& G, const float* xp, int64_t xb, int64_t xt, const float* wt,
                              const float* bias, float* out, int64_t begin, int64_t end) {
  const float* taps[kConvBlock][kTaps];
  for (int64_t blk = begin; blk < end; blk += kConvBlock) {
    const int64_t n = std::min(kConvBlock, end - blk);
    conv_block_taps(taps, G, xp, xb, xt, blk, n);
    for (int64_t c0 = 0; c0 < G.C; c0 += 16) {
      __m512 w[kTaps];
      for (int k = 0; k < kTaps; ++k) w[k] = _mm512_loadu_ps(wt + k * G.C + c0);
      const __m512 b0 = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 pre = tap_sum512(w, taps[i], c0, b0);
        _mm512_storeu_ps(out + (blk + i) * G.C + c0, _mm512_mul_ps(pre, sigmoid512(pre)));
      }
    }
  }
}

// Backward's first pass for the tokens [begin, end): dpre = grad * SiLU'(pre) (pre recomputed) into dpre, and the
// weight and bias gradients added to acc ((9 + 1) rows of C: the taps, then the bias)
void conv_silu_dpre_avx512(const ConvGeometry& G, const float* gp, const float* xp, int64_t xb, int64_t xt,
                           const float* wt, const float* bias, float* dpre, float* acc, int64_t begin,
                           int64_t end) {
  const float* taps[kConvBlock][kTaps];
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t blk = begin; blk < end; blk += kConvBlock) {
    const int64_t n = std::min(kConvBlock, end - blk);
    conv_block_taps(taps, G, xp, xb, xt, blk, n);
    for (int64_t c0 = 0; c0 < G.C; c0 += 16) {
      __m512 w[kTaps], dw[kTaps];
      for (int k = 0; k < kTaps; ++k) {
        w[k] = _mm512_loadu_ps(wt + k * G.C + c0);
        dw[k] = _mm512_loadu_ps(acc + k * G.C + c0);
      }
      __m512 db = _mm512_loadu_ps(acc + kTaps * G.C + c0);
      const __m512 b0 = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 pre = tap_sum512(w, taps[i], c0, b0);
        const __m512 s = sigmoid512(pre);
        // d SiLU / d pre = s (1 + pre (1 - s))
        const __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(pre, _mm512_sub_ps(one, s), one));
        const __m512 d = _mm512_mul_ps(_mm512_loadu_ps(gp + (blk + i) * G.C + c0), slope);
        _mm512_storeu_ps(dpre + (blk + i) * G.C + c0, d);
        db = _mm512_add_ps(db, d);
        for (int k = 0; k < kTaps; ++k) dw[k] = _mm512_fmadd_ps(d, _mm512_loadu_ps(taps[i][k] + c0), dw[k]);
      }
      for (int k = 0; k < kTaps; ++k) _mm512_storeu_ps(acc + k * G.C + c0, dw[k]);
      _mm512_storeu_ps(acc + kTaps * G.C + c0, db);
    }
  }
}

// Backward's second pass for the grid tokens [begin, end) (idx = b S + s, S the grid's tokens): dx = the sum over
// the taps of w * dpre of the own-row output that reads the token there, written (before `accumulate_from`) or
// added to o, plus the addend on the own rows (rows of a, at token stride at, batch stride ab; a null where none)
void conv_silu_dx_avx512(const ConvGeometry& G, const float* dpre, const float* wt, float* o, int64_t ob, int64_t ot,
                         int64_t accumulate_from, const float* a, int64_t ab, int64_t at, int64_t begin,
                         int64_t end) {
  const int64_t S = G.grid_rows * G.grid_cols, own0 = G.row0 * G.grid_cols;
  const float* taps[kConvBlock][kTaps];
  for (int64_t blk = begin; blk < end; blk += kConvBlock) {
    const int64_t n = std::min(kConvBlock, end - blk);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t idx = blk + i, b = idx / S, s = idx % S, r = s / G.grid_cols, c = s % G.grid_cols;
      for (int ki = 0; ki < 3; ++ki) {
        const int64_t rq = r - ki + 1 - G.row0;  // the own-rows output row that reads this token at offset ki
        for (int kj = 0; kj < 3; ++kj) {
          const int64_t cq = c - kj + 1;
          taps[i][ki * 3 + kj] = (rq < 0 || rq >= G.rows || cq < 0 || cq >= G.grid_cols)
                                     ? G.zeros() : dpre + (b * G.T + rq * G.grid_cols + cq) * G.C;
        }
      }
    }
    for (int64_t c0 = 0; c0 < G.C; c0 += 16) {
      __m512 w[kTaps];
      for (int k = 0; k < kTaps; ++k) w[k] = _mm512_loadu_ps(wt + k * G.C + c0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t idx = blk + i, b = idx / S, s = idx % S;
        float* dst = o + b * ob + s * ot + c0;
        __m512 sum = s < accumulate_from ? _mm512_setzero_ps() : _mm512_loadu_ps(dst);
        if (a && s >= own0 && s < own0 + G.T)
          sum = _mm512_add_ps(sum, _mm512_loadu_ps(a + b * ab + (s - own0) * at + c0));
        _mm512_storeu_ps(dst, tap_sum512(w, taps[i], c0, sum));
      }
    }
  }
}
#endif

}  // namespace

// Depthwise k x k convolution over rows [row0, row0 + rows) of a grid of `grid_rows` x `grid_cols` tokens (zero
// padding outside the grid), then SiLU. x (B, grid_rows * grid_cols, C), weight (C, k * k), bias (C) or undefined ->
// (B, rows * grid_cols, C). The pre-activation is not kept: backward recomputes it (nine multiply-adds per value).
at::Tensor conv_silu_forward(const at::Tensor& x, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& bias,
                                          int64_t grid_rows, int64_t grid_cols, int64_t row0, int64_t rows) {
  // each operator records itself for the profiler under its registered name (vil_layer.py calls the function
  // directly where no dispatch mode needs the registered operator)
  RECORD_FUNCTION("vilseg::conv_silu", std::vector<c10::IValue>());
  check_rows(x, "x");
  const int64_t B = x.size(0), C = x.size(2), KK = weight.size(1);
  const int64_t K = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(KK))));
  TORCH_CHECK(K * K == KK && weight.size(0) == C, "weight must be (C, k * k)");
  TORCH_CHECK(x.size(1) == grid_rows * grid_cols && row0 >= 0 && row0 + rows <= grid_rows, "bad grid");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  check_vector(bias, C, x.scalar_type(), "bias");
  auto out = at::empty({B, rows * grid_cols, C}, x.options());
  auto wt = weight.t().contiguous();  // (k * k, C): contiguous over channels
  dispatch_floating(x.scalar_type(), "conv_silu_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t xb = x.stride(0), xt = x.stride(1), T = rows * grid_cols;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (ConvGeometry::fits(K, C)) {
        const ConvGeometry G(T, C, grid_rows, grid_cols, row0, rows);
        at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
          conv_silu_forward_avx512(G, xp, xb, xt, wp, bp, op, begin, end);
        });
        return;
      }
    }
#endif
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> pre(C);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T, r = row0 + t / grid_cols, c = t % grid_cols;
        scalar_t* acc = pre.data();
        conv_pre_activation(acc, xp + b * xb, xt, wp, bp, C, K, grid_rows, grid_cols, r, c);
        scalar_t* o = op + idx * C;
        #pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) o[ch] = acc[ch] * sigmoid(acc[ch]);
      }
    });
  });
  return out;
}

// Backward of conv_silu_forward: grad (B, rows * grid_cols, C) of its output -> [grad of x (B, grid_rows * grid_cols,
// C; zero on rows the convolution does not read), grad of weight (C, k * k), grad of bias (C)]. The grad of x goes
// into `out` where given (a (B, grid_rows * grid_cols, C) view with unit channel stride, e.g. of a larger gradient
// buffer): written on the tokens before `accumulate_from`, added to from it on; `addend` (B, rows * grid_cols, C),
// where given, is added on the own rows (another gradient of the same tokens).
std::vector<at::Tensor> conv_silu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, int64_t grid_rows,
                                           int64_t grid_cols, int64_t row0, int64_t rows,
                                           const c10::optional<at::Tensor>& out, int64_t accumulate_from,
                                           const c10::optional<at::Tensor>& addend) {
  RECORD_FUNCTION("vilseg::conv_silu_backward", std::vector<c10::IValue>());
  check_rows(x, "x");
  const int64_t B = x.size(0), C = x.size(2), KK = weight.size(1);
  const int64_t K = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(KK)))), P = K / 2;
  const int64_t T = rows * grid_cols;
  TORCH_CHECK(K * K == KK && weight.size(0) == C && weight.scalar_type() == x.scalar_type(),
              "weight must be (C, k * k)");
  TORCH_CHECK(x.size(1) == grid_rows * grid_cols && row0 >= 0 && row0 + rows <= grid_rows, "bad grid");
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == T && grad.size(2) == C, "grad must be (B, rows * grid_cols, C)");
  check_vector(bias, C, x.scalar_type(), "bias");
  auto g = grad.contiguous();
  // gradient of the pre-activation, then a gather for dx (each input token sums its k x k neighbours)
  auto dpre = at::empty({B, T, C}, x.options());
  auto dx = given_or_new(out, {B, grid_rows * grid_cols, C}, x, "out", "(B, grid_rows * grid_cols, C) of x's dtype");
  if (addend) {
    check_rows(*addend, "addend");
    TORCH_CHECK(addend->size(0) == B && addend->size(1) == T && addend->size(2) == C &&
                    addend->scalar_type() == x.scalar_type(), "addend must be (B, rows * grid_cols, C) of x's dtype");
  }
  auto dwb = at::empty({KK + 1, C}, x.options());  // k * k rows of weight sums, then the bias sums
  auto wt = weight.t().contiguous();
  dispatch_floating(x.scalar_type(), "conv_silu_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = wt.data_ptr<scalar_t>();
    const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = dpre.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const scalar_t* ap = addend ? addend->data_ptr<scalar_t>() : nullptr;
    const int64_t ab = addend ? addend->stride(0) : 0, at_ = addend ? addend->stride(1) : 0;
    const int64_t xb = x.stride(0), xt = x.stride(1), S = grid_rows * grid_cols;
    const int64_t ob = dx.stride(0), ot = dx.stride(1), own0 = row0 * grid_cols;
    ThreadSums<scalar_t> sums((KK + 1) * C);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (ConvGeometry::fits(K, C)) {
        const ConvGeometry G(T, C, grid_rows, grid_cols, row0, rows);
        at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
          conv_silu_dpre_avx512(G, gp, xp, xb, xt, wp, bp, dp, sums.local(), begin, end);
        });
        sums.reduce_into(dwb.data_ptr<float>());
        at::parallel_for(0, B * S, 16, [&](int64_t begin, int64_t end) {
          conv_silu_dx_avx512(G, dp, wp, dxp, ob, ot, accumulate_from, ap, ab, at_, begin, end);
        });
        return;
      }
    }
#endif
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      scalar_t* acc = sums.local();
      std::vector<scalar_t> pre(C);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T, r = row0 + t / grid_cols, c = t % grid_cols;
        scalar_t* a = pre.data();  // the forward's pre-activation, recomputed
        conv_pre_activation(a, xp + b * xb, xt, wp, bp, C, K, grid_rows, grid_cols, r, c);
        const scalar_t* gr = gp + idx * C;
        scalar_t* d = dp + idx * C;
        #pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) {
          const scalar_t s = sigmoid(a[ch]);
          d[ch] = gr[ch] * s * (scalar_t(1) + a[ch] * (scalar_t(1) - s));
        }
        scalar_t* dbias = acc + KK * C;
        #pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) dbias[ch] += d[ch];
        for_each_tap(r, c, K, grid_rows, grid_cols, [&](int64_t tap, int64_t token) {
          const scalar_t* __restrict__ xr = xp + b * xb + token * xt;
          scalar_t* __restrict__ w = acc + tap * C;
          #pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) w[ch] += d[ch] * xr[ch];
        });
      }
    });
    sums.reduce_into(dwb.data_ptr<scalar_t>());
    at::parallel_for(0, B * S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / S, s = idx % S, r = s / grid_cols, c = s % grid_cols;
        scalar_t* o = dxp + b * ob + s * ot;
        if (s < accumulate_from) {
          #pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) o[ch] = scalar_t(0);
        }
        if (ap && s >= own0 && s < own0 + T) {
          const scalar_t* a = ap + b * ab + (s - own0) * at_;
          #pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) o[ch] += a[ch];
        }
        for (int64_t i = 0; i < K; ++i) {
          const int64_t rq = r - i + P - row0;  // output row (in the own rows) that reads this token at offset i
          if (rq < 0 || rq >= rows) continue;
          for (int64_t j = 0; j < K; ++j) {
            const int64_t cq = c - j + P;
            if (cq < 0 || cq >= grid_cols) continue;
            const scalar_t* d = dp + (b * T + rq * grid_cols + cq) * C;
            const scalar_t* w = wp + (i * K + j) * C;
            #pragma omp simd
            for (int64_t ch = 0; ch < C; ++ch) o[ch] += w[ch] * d[ch];
          }
        }
      }
    });
  });
  return {dx, dwb.narrow(0, 0, KK).t().contiguous(), dwb[KK]};
}

// The cell's output side: per-head LayerNorm of the kernel output h (B, NH, T, DH) with the affine weight / bias
// (C = NH * DH; either may be undefined), plus the learnable skip of the conv branch xc (B, T, C), times SiLU(z)
// (B, T, C): -> [out (B, T, C), mean (B, NH, T), rstd (B, NH, T)].
std::vector<at::Tensor> gated_norm_forward(const at::Tensor& h, const c10::optional<at::Tensor>& norm_weight,
                                           const c10::optional<at::Tensor>& norm_bias, const at::Tensor& skip,
                                           const at::Tensor& xc, const at::Tensor& z, double eps,
                                           const c10::optional<at::Tensor>& out_view) {
  RECORD_FUNCTION("vilseg::gated_head_norm", std::vector<c10::IValue>());
  check_rows(xc, "xc");
  check_rows(z, "z");
  TORCH_CHECK(h.dim() == 4 && h.is_contiguous(), "h must be a contiguous (B, NH, T, DH)");
  const int64_t B = h.size(0), NH = h.size(1), T = h.size(2), DH = h.size(3), C = NH * DH;
  TORCH_CHECK(xc.size(0) == B && xc.size(1) == T && xc.size(2) == C && z.sizes() == xc.sizes(), "shape mismatch");
  TORCH_CHECK(xc.scalar_type() == h.scalar_type() && z.scalar_type() == h.scalar_type(), "dtypes differ");
  check_vector(norm_weight, C, h.scalar_type(), "norm_weight");
  check_vector(norm_bias, C, h.scalar_type(), "norm_bias");
  check_vector(skip, C, h.scalar_type(), "skip");
  // (out_view: e.g. a tile's rows of the layer's output)
  auto out = given_or_new(out_view, {B, T, C}, xc, "out", "(B, T, C) of xc's dtype");
  auto mean = at::empty({B, NH, T}, xc.options());
  auto rstd = at::empty({B, NH, T}, xc.options());
  dispatch_floating(h.scalar_type(), "gated_norm_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* wp = norm_weight ? norm_weight->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = norm_bias ? norm_bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = skip.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    const int64_t xb = xc.stride(0), xt = xc.stride(1), zb = z.stride(0), zt = z.stride(1);
    const int64_t ob = out.stride(0), ot = out.stride(1);
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T;
        const scalar_t* x = xp + b * xb + t * xt;
        const scalar_t* zz = zp + b * zb + t * zt;
        scalar_t* o = op + b * ob + t * ot;
        for (int64_t head = 0; head < NH; ++head) {
          const scalar_t* hr = hp + ((b * NH + head) * T + t) * DH;
          scalar_t s = 0, ss = 0;
          #pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < DH; ++d) s += hr[d];
          const scalar_t mu = s / DH;
          #pragma omp simd reduction(+ : ss)
          for (int64_t d = 0; d < DH; ++d) ss += (hr[d] - mu) * (hr[d] - mu);
          const scalar_t rs = scalar_t(1) / std::sqrt(ss / DH + static_cast<scalar_t>(eps));
          mp[(b * NH + head) * T + t] = mu;
          rp[(b * NH + head) * T + t] = rs;
          const int64_t c0 = head * DH;
          #pragma omp simd
          for (int64_t d = 0; d < DH; ++d) {
            const int64_t c = c0 + d;
            scalar_t y = (hr[d] - mu) * rs;
            if (wp) y *= wp[c];
            if (bp) y += bp[c];
            y += sp[c] * x[c];
            o[c] = y * zz[c] * sigmoid(zz[c]);
          }
        }
      }
    });
  });
  return {out, mean, rstd};
}

// One token of gated_norm_backward: h rows of the NH heads at stride head_stride (mean / rstd at stride
// stat_stride), parameter-gradient sums into acc (3 C), buf: 2 C scratch.
template <typename scalar_t>
inline void gated_norm_backward_token(const scalar_t* __restrict__ g, const scalar_t* __restrict__ h,
                                      int64_t head_stride, const scalar_t* __restrict__ mean,
                                      const scalar_t* __restrict__ rstd, int64_t stat_stride,
                                      const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                                      const scalar_t* __restrict__ skip, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ z, scalar_t* __restrict__ dh,
                                      scalar_t* __restrict__ dx, scalar_t* __restrict__ dz,
                                      scalar_t* __restrict__ acc, scalar_t* __restrict__ buf,
                                      int64_t NH, int64_t DH) {
  const int64_t C = NH * DH;
  scalar_t* __restrict__ dn = buf;      // gradient of the normalised h
  scalar_t* __restrict__ hn = buf + C;  // normalised h
  scalar_t* __restrict__ dw = acc;
  scalar_t* __restrict__ db = acc + C;
  scalar_t* __restrict__ ds = acc + 2 * C;
  for (int64_t head = 0; head < NH; ++head) {
    const scalar_t mu = mean[head * stat_stride], rs = rstd[head * stat_stride];
    const scalar_t* hr = h + head * head_stride;
#pragma omp simd
    for (int64_t d = 0; d < DH; ++d) hn[head * DH + d] = (hr[d] - mu) * rs;
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t n = hn[c];
    const scalar_t y = (w ? n * w[c] : n) + (bias ? bias[c] : scalar_t(0)) + skip[c] * x[c];
    const scalar_t sg = sigmoid(z[c]);
    const scalar_t dy = g[c] * z[c] * sg;
    dz[c] = g[c] * y * sg * (scalar_t(1) + z[c] * (scalar_t(1) - sg));
    dx[c] = dy * skip[c];
    dw[c] += dy * n;
    db[c] += dy;
    ds[c] += dy * x[c];
    dn[c] = w ? dy * w[c] : dy;
  }
  for (int64_t head = 0; head < NH; ++head) {
    const scalar_t* dnh = dn + head * DH;
    const scalar_t* hnh = hn + head * DH;
    scalar_t sum_d = 0, sum_dh = 0;
#pragma omp simd reduction(+ : sum_d, sum_dh)
    for (int64_t d = 0; d < DH; ++d) {
      sum_d += dnh[d];
      sum_dh += dnh[d] * hnh[d];
    }
    sum_d /= DH;
    sum_dh /= DH;
    const scalar_t rs = rstd[head * stat_stride];
    scalar_t* dr = dh + head * head_stride;
#pragma omp simd
    for (int64_t d = 0; d < DH; ++d) dr[d] = rs * (dnh[d] - sum_d - hnh[d] * sum_dh);
  }
}

// Backward of gated_norm_forward: grad (B, T, C) -> [dh (B, NH, T, DH), dxc (B, T, C), dz (B, T, C), d norm weight
// (C), d norm bias (C), d skip (C)] (the norm gradients zero-sized where the forward had none).
std::vector<at::Tensor> gated_norm_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& mean,
                                            const at::Tensor& rstd, const c10::optional<at::Tensor>& norm_weight,
                                            const c10::optional<at::Tensor>& norm_bias, const at::Tensor& skip,
                                            const at::Tensor& xc, const at::Tensor& z,
                                            const c10::optional<at::Tensor>& dz_out) {
  RECORD_FUNCTION("vilseg::gated_head_norm_backward", std::vector<c10::IValue>());
  const int64_t B = h.size(0), NH = h.size(1), T = h.size(2), DH = h.size(3), C = NH * DH;
  auto g = grad.contiguous();
  auto dh = at::empty_like(h);
  auto dxc = at::empty({B, T, C}, xc.options());
  auto dz = given_or_new(dz_out, xc.sizes(), xc, "dz_out", "(B, T, C) of xc's dtype");  // e.g. of a larger buffer
  auto dparams = at::empty({3, C}, xc.options());  // norm weight, norm bias, skip
  dispatch_floating(h.scalar_type(), "gated_norm_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* mp = mean.data_ptr<scalar_t>();
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    const scalar_t* wp = norm_weight ? norm_weight->data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = norm_bias ? norm_bias->data_ptr<scalar_t>() : nullptr;
    const scalar_t* sp = skip.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* dxp = dxc.data_ptr<scalar_t>();
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    const int64_t xb = xc.stride(0), xt = xc.stride(1), zb = z.stride(0), zt = z.stride(1);
    const int64_t dzb = dz.stride(0), dzt = dz.stride(1);
    ThreadSums<scalar_t> sums(3 * C);
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      scalar_t* acc = sums.local();
      std::vector<scalar_t> buf(2 * C);
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T;
        gated_norm_backward_token(gp + idx * C, hp + (b * NH * T + t) * DH, T * DH, mp + b * NH * T + t,
                                  rp + b * NH * T + t, T, wp, bp, sp, xp + b * xb + t * xt, zp + b * zb + t * zt,
                                  dhp + (b * NH * T + t) * DH, dxp + idx * C, dzp + b * dzb + t * dzt, acc,
                                  buf.data(), NH, DH);
      }
    });
    sums.reduce_into(dparams.data_ptr<scalar_t>());
  });
  // separate tensors, not views of one buffer (PyTorch operators may not return aliases of each other)
  return {dh, dxc, dz, norm_weight ? dparams[0].clone() : at::Tensor(), norm_bias ? dparams[1].clone() : at::Tensor(),
          dparams[2].clone()};
}

// Block-diagonal projections with 4 x 4 blocks (weights (C / 4, 4, 4) as (out, in), bias (C) or undefined). Each
// output channel c reads the four inputs of its block, (c & ~3) + i: written per channel, the loop vectorises.
constexpr int64_t kBlock = 4;

// (C / 4, 4, 4) block weights -> (4, C): row i holds, for every output channel c = 4 blk + o, W[blk, o, i]; with
// transpose_blocks W[blk, i, o] instead (the backward's map from output to input gradients).
at::Tensor per_channel_weights(const at::Tensor& w, bool transpose_blocks) {
  auto wt = transpose_blocks ? w : w.transpose(1, 2);  // (blk, i, o) for the forward
  return wt.permute({1, 0, 2}).reshape({kBlock, -1}).contiguous();
}

#if defined(__AVX512F__)
// acc + sum_i wt[i][c] x[(c & ~3) + i] for the 16 channels at wt (rows of C): the block-diagonal map of one register
// of a row. A register holds whole blocks, so the x of a block are broadcast within each 128-bit lane (vpermilps);
// the compiler alone would gather.
inline __m512 block_map16(const float* wt, int64_t C, __m512 x, __m512 acc) {
  acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt), _mm512_permute_ps(x, 0x00), acc);
  acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt + C), _mm512_permute_ps(x, 0x55), acc);
  acc = _mm512_fmadd_ps(_mm512_loadu_ps(wt + 2 * C), _mm512_permute_ps(x, 0xAA), acc);
  return _mm512_fmadd_ps(_mm512_loadu_ps(wt + 3 * C), _mm512_permute_ps(x, 0xFF), acc);
}
#endif

// y[c] = bias[c] + sum_i wt[i][c] x[(c & ~3) + i] (bias may be null), a SIMD register at a time.
template <typename scalar_t>
inline void block_map(const scalar_t* __restrict__ wt, const scalar_t* __restrict__ bias,
                      const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t C) {
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; c + 16 <= C; c += 16)
      _mm512_storeu_ps(y + c, block_map16(wt + c, C, _mm512_loadu_ps(x + c),
                                          bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps()));
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; c + 8 <= C; c += 8) {
      const __m256 xv = _mm256_loadu_ps(x + c);
      __m256 acc = bias ? _mm256_loadu_ps(bias + c) : _mm256_setzero_ps();
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + c), _mm256_permute_ps(xv, 0x00), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + C + c), _mm256_permute_ps(xv, 0x55), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + 2 * C + c), _mm256_permute_ps(xv, 0xAA), acc);
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(wt + 3 * C + c), _mm256_permute_ps(xv, 0xFF), acc);
      _mm256_storeu_ps(y + c, acc);
    }
  }
#endif
  for (; c < C; ++c) {
    const int64_t base = c & ~int64_t(3);
    scalar_t acc = bias ? bias[c] : scalar_t(0);
    acc += wt[c] * x[base] + wt[C + c] * x[base + 1] + wt[2 * C + c] * x[base + 2] + wt[3 * C + c] * x[base + 3];
    y[c] = acc;
  }
}

// rows[o][c] += g[(c & ~3) + o] x[c] for o < 4: the block weight gradients of one token.
template <typename scalar_t>
inline void block_outer_add(scalar_t* __restrict__ rows, const scalar_t* __restrict__ g,
                            const scalar_t* __restrict__ x, int64_t C) {
  int64_t c = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; c + 16 <= C; c += 16) {
      const __m512 gv = _mm512_loadu_ps(g + c), xv = _mm512_loadu_ps(x + c);
      float* r = rows + c;
      _mm512_storeu_ps(r, _mm512_fmadd_ps(_mm512_permute_ps(gv, 0x00), xv, _mm512_loadu_ps(r)));
      _mm512_storeu_ps(r + C, _mm512_fmadd_ps(_mm512_permute_ps(gv, 0x55), xv, _mm512_loadu_ps(r + C)));
      _mm512_storeu_ps(r + 2 * C, _mm512_fmadd_ps(_mm512_permute_ps(gv, 0xAA), xv, _mm512_loadu_ps(r + 2 * C)));
      _mm512_storeu_ps(r + 3 * C, _mm512_fmadd_ps(_mm512_permute_ps(gv, 0xFF), xv, _mm512_loadu_ps(r + 3 * C)));
    }
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; c + 8 <= C; c += 8) {
      const __m256 gv = _mm256_loadu_ps(g + c), xv = _mm256_loadu_ps(x + c);
      float* r = rows + c;
      _mm256_storeu_ps(r, _mm256_fmadd_ps(_mm256_permute_ps(gv, 0x00), xv, _mm256_loadu_ps(r)));
      _mm256_storeu_ps(r + C, _mm256_fmadd_ps(_mm256_permute_ps(gv, 0x55), xv, _mm256_loadu_ps(r + C)));
      _mm256_storeu_ps(r + 2 * C, _mm256_fmadd_ps(_mm256_permute_ps(gv, 0xAA), xv, _mm256_loadu_ps(r + 2 * C)));
      _mm256_storeu_ps(r + 3 * C, _mm256_fmadd_ps(_mm256_permute_ps(gv, 0xFF), xv, _mm256_loadu_ps(r + 3 * C)));
    }
  }
#endif
  for (; c < C; ++c) {
    const int64_t base = c & ~int64_t(3);
    for (int64_t o = 0; o < kBlock; ++o) rows[o * C + c] += g[base + o] * x[c];
  }
}

#if defined(__AVX512F__)
namespace {

// The float32 AVX-512 forms of cell_inputs_forward / _backward for G = 2 NH gates and heads of a multiple of 16
// channels, where a register's 16 channels lie in one head: each token's three projections go straight into the
// head layout and its G gate sums stay in G registers (one horizontal sum each, not one per gate and channel
// block); backward keeps its weight-gradient sums in registers over a block of tokens instead of adding them to
// memory on every token.
struct CellInputsPointers {
  const float* x[2];           // xc, xm (token rows, unit channel stride)
  int64_t x_batch[2], x_token[2];
  const float* w[3];           // per-channel block weights (4, C) of q, k, v
  const float* gate_w[2];      // (G, C) on xc, on xm
  int64_t T, C, NH;
};

template <int G>
void cell_inputs_forward_avx512(const CellInputsPointers& P, const float* const bias[3], const float* gate_b,
                                float* const out[3], float* ig, float* fg, int64_t begin, int64_t end) {
  const int64_t T = P.T, C = P.C, NH = P.NH, DH = C / NH;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t b = idx / T, t = idx % T;
    const float* xc = P.x[0] + b * P.x_batch[0] + t * P.x_token[0];
    const float* xm = P.x[1] + b * P.x_batch[1] + t * P.x_token[1];
    __m512 acc[G];
    for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __m512 xcv = _mm512_loadu_ps(xc + c0), xmv = _mm512_loadu_ps(xm + c0);
      const int64_t at = ((b * NH + c0 / DH) * T + t) * DH + c0 % DH;
      for (int p = 0; p < 3; ++p) {
        const __m512 b0 = bias[p] ? _mm512_loadu_ps(bias[p] + c0) : _mm512_setzero_ps();
        _mm512_storeu_ps(out[p] + at, block_map16(P.w[p] + c0, C, p < 2 ? xcv : xmv, b0));
      }
      for (int j = 0; j < G; ++j) {
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(P.gate_w[0] + j * C + c0), xcv, acc[j]);
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(P.gate_w[1] + j * C + c0), xmv, acc[j]);
      }
    }
    for (int j = 0; j < G; ++j) {
      const int64_t head = j < NH ? j : j - NH;
      (j < NH ? ig : fg)[(b * NH + head) * T + t] = _mm512_reduce_add_ps(acc[j]) + gate_b[j];
    }
  }
}

// acc: the thread's sums, laid out as in cell_inputs_backward
template <int G>
void cell_inputs_backward_avx512(const CellInputsPointers& P, const float* const grad[3], const float* digate,
                                 const float* dfgate, float* dxc, float* dxm, bool add_to_dxc, float* acc,
                                 int64_t begin, int64_t end) {
  constexpr int64_t kTokens = 32;  // a block's rows of every input stay in L2 through the three passes below
  const int64_t T = P.T, C = P.C, NH = P.NH, DH = C / NH, per = (kBlock + 1) * C;
  float* acc_wc = acc + 3 * per;
  float* acc_wm = acc_wc + G * C;
  float* acc_b = acc_wm + G * C;
  float dg[kTokens * G];
  int64_t grad_at[kTokens], x_at[2][kTokens];
  for (int64_t t0 = begin; t0 < end; t0 += kTokens) {
    const int64_t n = std::min(kTokens, end - t0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = (t0 + i) / T, t = (t0 + i) % T;
      grad_at[i] = (b * NH * T + t) * DH;  // + the head's offset below
      for (int s = 0; s < 2; ++s) x_at[s][i] = b * P.x_batch[s] + t * P.x_token[s];
      for (int j = 0; j < G; ++j) {
        const int64_t head = j < NH ? j : j - NH;
        dg[i * G + j] = (j < NH ? digate : dfgate)[(b * NH + head) * T + t];
        acc_b[j] += dg[i * G + j];
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t head_at = (c0 / DH) * T * DH + c0 % DH;
      // input gradients: the three maps back and the gates'
      __m512 wc[G], wm[G];
      for (int j = 0; j < G; ++j) {
        wc[j] = _mm512_loadu_ps(P.gate_w[0] + j * C + c0);
        wm[j] = _mm512_loadu_ps(P.gate_w[1] + j * C + c0);
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g_at = grad_at[i] + head_at;
        float* oc = dxc + (t0 + i) * C + c0;
        float* om = dxm + (t0 + i) * C + c0;
        __m512 a = block_map16(P.w[0] + c0, C, _mm512_loadu_ps(grad[0] + g_at),
                               add_to_dxc ? _mm512_loadu_ps(oc) : _mm512_setzero_ps());
        a = block_map16(P.w[1] + c0, C, _mm512_loadu_ps(grad[1] + g_at), a);
        __m512 m = block_map16(P.w[2] + c0, C, _mm512_loadu_ps(grad[2] + g_at), _mm512_setzero_ps());
        for (int j = 0; j < G; ++j) {
          const __m512 d = _mm512_set1_ps(dg[i * G + j]);
          a = _mm512_fmadd_ps(d, wc[j], a);
          m = _mm512_fmadd_ps(d, wm[j], m);
        }
        _mm512_storeu_ps(oc, a);
        _mm512_storeu_ps(om, m);
      }
      // block weights and biases: rows[o][c] += g[(c & ~3) + o] x[c]
      for (int p = 0; p < 3; ++p) {
        const int s = p < 2 ? 0 : 1;
        __m512 r0 = _mm512_setzero_ps(), r1 = r0, r2 = r0, r3 = r0, rb = r0;
        for (int64_t i = 0; i < n; ++i) {
          const __m512 g = _mm512_loadu_ps(grad[p] + grad_at[i] + head_at);
          const __m512 x = _mm512_loadu_ps(P.x[s] + x_at[s][i] + c0);
          r0 = _mm512_fmadd_ps(_mm512_permute_ps(g, 0x00), x, r0);
          r1 = _mm512_fmadd_ps(_mm512_permute_ps(g, 0x55), x, r1);
          r2 = _mm512_fmadd_ps(_mm512_permute_ps(g, 0xAA), x, r2);
          r3 = _mm512_fmadd_ps(_mm512_permute_ps(g, 0xFF), x, r3);
          rb = _mm512_add_ps(rb, g);
        }
        float* rows = acc + p * per + c0;
        const __m512 r[5] = {r0, r1, r2, r3, rb};
        for (int o = 0; o <= kBlock; ++o)
          _mm512_storeu_ps(rows + o * C, _mm512_add_ps(_mm512_loadu_ps(rows + o * C), r[o]));
      }
      // gate weights
      __m512 sc[G], sm[G];
      for (int j = 0; j < G; ++j) sc[j] = sm[j] = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; ++i) {
        const __m512 xc = _mm512_loadu_ps(P.x[0] + x_at[0][i] + c0);
        const __m512 xm = _mm512_loadu_ps(P.x[1] + x_at[1][i] + c0);
        for (int j = 0; j < G; ++j) {
          const __m512 d = _mm512_set1_ps(dg[i * G + j]);
          sc[j] = _mm512_fmadd_ps(d, xc, sc[j]);
          sm[j] = _mm512_fmadd_ps(d, xm, sm[j]);
        }
      }
      for (int j = 0; j < G; ++j) {
        float* a = acc_wc + j * C + c0;
        float* m = acc_wm + j * C + c0;
        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), sc[j]));
        _mm512_storeu_ps(m, _mm512_add_ps(_mm512_loadu_ps(m), sm[j]));
      }
    }
  }
}

CellInputsPointers simd_pointers(const at::Tensor& xc, const at::Tensor& xm, const std::vector<at::Tensor>& ws,
                                 const at::Tensor& gate_wc_t, const at::Tensor& gate_wm_t, int64_t num_heads) {
  CellInputsPointers P;
  const at::Tensor* xs[2] = {&xc, &xm};
  for (int s = 0; s < 2; ++s) {
    P.x[s] = xs[s]->data_ptr<float>();
    P.x_batch[s] = xs[s]->stride(0);
    P.x_token[s] = xs[s]->stride(1);
  }
  for (int p = 0; p < 3; ++p) P.w[p] = ws[p].data_ptr<float>();
  P.gate_w[0] = gate_wc_t.data_ptr<float>();
  P.gate_w[1] = gate_wm_t.data_ptr<float>();
  P.T = xc.size(1);
  P.C = xc.size(2);
  P.NH = num_heads;
  return P;
}

// Calls fn(std::integral_constant<int, G>) for the gate counts the AVX-512 forms are built for (1 to 4 heads);
// false where G is another
template <typename F>
bool with_gate_count(int64_t G, F&& fn) {
  switch (G) {
    case 2: fn(std::integral_constant<int, 2>{}); return true;
    case 4: fn(std::integral_constant<int, 4>{}); return true;
    case 6: fn(std::integral_constant<int, 6>{}); return true;
    case 8: fn(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

}  // namespace
#endif

// The cell's inputs from the layer's two branches: q, k from xc (B, T, C) and v from xm (B, T, C) through the 4 x 4
// block-diagonal projections, written straight into the kernel's head layout (B, NH, T, C / NH), and the input and
// forget gate pre-activations (B, NH, T) each, linear in [xc, xm] (gate_wc, gate_wm (C, 2 NH): the gate weights
// folded into the projections, input gates first; gate_b (2 NH)). One operator: each thread's block of tokens goes
// through the three projections and then the gates while its rows are still in cache.
std::vector<at::Tensor> cell_inputs_forward(const at::Tensor& xc, const at::Tensor& xm, const at::Tensor& wq,
                                            const at::Tensor& wk, const at::Tensor& wv,
                                            const c10::optional<at::Tensor>& bq, const c10::optional<at::Tensor>& bk,
                                            const c10::optional<at::Tensor>& bv, const at::Tensor& gate_wc,
                                            const at::Tensor& gate_wm, const at::Tensor& gate_b, int64_t num_heads) {
  RECORD_FUNCTION("vilseg::cell_inputs", std::vector<c10::IValue>());
  check_rows(xc, "xc");
  check_rows(xm, "xm");
  const int64_t B = xc.size(0), T = xc.size(1), C = xc.size(2), G = 2 * num_heads;
  const int64_t DH = C / num_heads;
  TORCH_CHECK(wq.size(1) == kBlock && wq.size(2) == kBlock && wq.size(0) * kBlock == C, "4 x 4 blocks expected");
  TORCH_CHECK(DH * num_heads == C && DH % kBlock == 0, "blocks must tile the heads");
  TORCH_CHECK(xm.sizes() == xc.sizes() && xm.scalar_type() == xc.scalar_type(), "xm must be like xc");
  for (const auto* w : {&wq, &wk, &wv})
    TORCH_CHECK(w->sizes() == wq.sizes() && w->scalar_type() == xc.scalar_type(), "block weights differ");
  check_vector(bq, C, xc.scalar_type(), "bq");
  check_vector(bk, C, xc.scalar_type(), "bk");
  check_vector(bv, C, xc.scalar_type(), "bv");
  for (const auto* w : {&gate_wc, &gate_wm})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == C && w->size(1) == G && w->scalar_type() == xc.scalar_type(),
                "gate weights must be (C, 2 num_heads) of xc's dtype");
  check_vector(gate_b, G, xc.scalar_type(), "gate_b");
  auto opts = xc.options();
  std::vector<at::Tensor> outs = {at::empty({B, num_heads, T, DH}, opts), at::empty({B, num_heads, T, DH}, opts),
                                  at::empty({B, num_heads, T, DH}, opts), at::empty({B, num_heads, T}, opts),
                                  at::empty({B, num_heads, T}, opts)};
  std::vector<at::Tensor> ws = {per_channel_weights(wq, false), per_channel_weights(wk, false),
                                per_channel_weights(wv, false)};
  std::vector<c10::optional<at::Tensor>> bs = {bq, bk, bv};
  auto gwc = gate_wc.t().contiguous(), gwm = gate_wm.t().contiguous();  // (2 NH, C): a gate's weights contiguous
  dispatch_floating(xc.scalar_type(), "cell_inputs_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (DH % 16 == 0) {
        const CellInputsPointers P = simd_pointers(xc, xm, ws, gwc, gwm, num_heads);
        const float* const bias[3] = {bq ? bq->data_ptr<float>() : nullptr, bk ? bk->data_ptr<float>() : nullptr,
                                      bv ? bv->data_ptr<float>() : nullptr};
        float* const out[3] = {outs[0].data_ptr<float>(), outs[1].data_ptr<float>(), outs[2].data_ptr<float>()};
        const bool done = with_gate_count(G, [&](auto g) {
          at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
            cell_inputs_forward_avx512<decltype(g)::value>(P, bias, gate_b.data_ptr<float>(), out,
                                                           outs[3].data_ptr<float>(), outs[4].data_ptr<float>(),
                                                           begin, end);
          });
        });
        if (done) return;
      }
    }
#endif
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row(C);
      for (int p = 0; p < 3; ++p) {
        const at::Tensor& x = p < 2 ? xc : xm;
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* wp = ws[p].data_ptr<scalar_t>();
        const scalar_t* bp = bs[p] ? bs[p]->data_ptr<scalar_t>() : nullptr;
        scalar_t* op = outs[p].data_ptr<scalar_t>();
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t b = idx / T, t = idx % T;
          block_map(wp, bp, xp + b * x.stride(0) + t * x.stride(1), row.data(), C);
          for (int64_t head = 0; head < num_heads; ++head)
            std::memcpy(op + ((b * num_heads + head) * T + t) * DH, row.data() + head * DH, DH * sizeof(scalar_t));
        }
      }
      const scalar_t* wc = gwc.data_ptr<scalar_t>();
      const scalar_t* wm = gwm.data_ptr<scalar_t>();
      const scalar_t* gb = gate_b.data_ptr<scalar_t>();
      scalar_t* ig = outs[3].data_ptr<scalar_t>();
      scalar_t* fg = outs[4].data_ptr<scalar_t>();
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T;
        const scalar_t* __restrict__ xcr = xc.data_ptr<scalar_t>() + b * xc.stride(0) + t * xc.stride(1);
        const scalar_t* __restrict__ xmr = xm.data_ptr<scalar_t>() + b * xm.stride(0) + t * xm.stride(1);
        for (int64_t j = 0; j < G; ++j) {
          const scalar_t* __restrict__ wcj = wc + j * C;
          const scalar_t* __restrict__ wmj = wm + j * C;
          scalar_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t c = 0; c < C; ++c) s += wcj[c] * xcr[c] + wmj[c] * xmr[c];
          const int64_t head = j < num_heads ? j : j - num_heads;
          (j < num_heads ? ig : fg)[(b * num_heads + head) * T + t] = s + gb[j];
        }
      }
    });
  });
  return outs;
}

// Backward of cell_inputs_forward: dq, dk, dv (B, NH, T, DH), d igate, d fgate (B, NH, T) -> [dxc, dxm (B, T, C),
// dwq, dwk, dwv (C / 4, 4, 4), dbq, dbk, dbv (C), d gate_wc, d gate_wm (C, 2 NH), d gate_b (2 NH)].
std::vector<at::Tensor> cell_inputs_backward(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                             const at::Tensor& digate, const at::Tensor& dfgate, const at::Tensor& xc,
                                             const at::Tensor& xm, const at::Tensor& wq, const at::Tensor& wk,
                                             const at::Tensor& wv, const at::Tensor& gate_wc,
                                             const at::Tensor& gate_wm, const c10::optional<at::Tensor>& dxc_addend) {
  RECORD_FUNCTION("vilseg::cell_inputs_backward", std::vector<c10::IValue>());
  const int64_t B = xc.size(0), T = xc.size(1), C = xc.size(2), NB = C / kBlock;
  const int64_t NH = dq.size(1), DH = C / NH, G = 2 * NH;
  TORCH_CHECK(digate.sizes() == dfgate.sizes() && digate.dim() == 3 && digate.size(1) == NH && digate.size(2) == T,
              "gate gradients must be (B, NH, T)");
  std::vector<at::Tensor> grads = {dq.contiguous(), dk.contiguous(), dv.contiguous()};
  auto dig = digate.contiguous(), dfg = dfgate.contiguous();
  std::vector<at::Tensor> ws = {per_channel_weights(wq, true), per_channel_weights(wk, true),
                                per_channel_weights(wv, true)};
  auto gwc = gate_wc.t().contiguous(), gwm = gate_wm.t().contiguous();
  // dxc_addend (another gradient of xc, contiguous (B, T, C), e.g. the output norm's): added to, and returned
  at::Tensor dxc;
  if (dxc_addend) {
    TORCH_CHECK(dxc_addend->is_contiguous() && dxc_addend->sizes() == xc.sizes() &&
                    dxc_addend->scalar_type() == xc.scalar_type(), "dxc_addend must be a contiguous (B, T, C) like xc");
    dxc = *dxc_addend;
  } else {
    dxc = at::empty({B, T, C}, xc.options());
  }
  const bool add_to_dxc = dxc_addend.has_value();
  auto dxm = at::empty({B, T, C}, xc.options());
  // per projection: (4, C) sums of g[(c & ~3) + o] x[c] (row o; -> dW[blk, o, i] with c = 4 blk + i), then C bias
  // sums; after the three projections the gates' (2 NH, C) weight sums on xc, on xm, and their 2 NH bias sums
  const int64_t per = (kBlock + 1) * C, gates_at = 3 * per;
  auto sums_out = at::empty({gates_at + 2 * G * C + G}, xc.options());
  dispatch_floating(xc.scalar_type(), "cell_inputs_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    ThreadSums<scalar_t> sums(gates_at + 2 * G * C + G);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (DH % 16 == 0) {
        const CellInputsPointers P = simd_pointers(xc, xm, ws, gwc, gwm, NH);
        const float* const g[3] = {grads[0].data_ptr<float>(), grads[1].data_ptr<float>(),
                                   grads[2].data_ptr<float>()};
        const bool done = with_gate_count(G, [&](auto gates) {
          at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
            cell_inputs_backward_avx512<decltype(gates)::value>(P, g, dig.data_ptr<float>(), dfg.data_ptr<float>(),
                                                                dxc.data_ptr<float>(), dxm.data_ptr<float>(),
                                                                add_to_dxc, sums.local(), begin, end);
          });
        });
        if (done) {
          sums.reduce_into(sums_out.data_ptr<float>());
          return;
        }
      }
    }
#endif
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      scalar_t* acc = sums.local();
      std::vector<scalar_t> g(C), dx(C);
      for (int p = 0; p < 3; ++p) {
        const at::Tensor& x = p < 2 ? xc : xm;
        const scalar_t* xp = x.data_ptr<scalar_t>();
        const scalar_t* gp = grads[p].data_ptr<scalar_t>();
        const scalar_t* wp = ws[p].data_ptr<scalar_t>();
        scalar_t* dxp = (p < 2 ? dxc : dxm).data_ptr<scalar_t>();
        scalar_t* a = acc + p * per;
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t b = idx / T, t = idx % T;
          for (int64_t head = 0; head < NH; ++head)
            std::memcpy(g.data() + head * DH, gp + ((b * NH + head) * T + t) * DH, DH * sizeof(scalar_t));
          const scalar_t* xr = xp + b * x.stride(0) + t * x.stride(1);
          scalar_t* out = dxp + idx * C;
          block_map(wp, static_cast<const scalar_t*>(nullptr), g.data(), dx.data(), C);
          if (p == 1 || (p == 0 && add_to_dxc)) {  // k's input gradient adds to q's (both read xc)
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) out[c] += dx[c];
          } else {
            std::memcpy(out, dx.data(), C * sizeof(scalar_t));
          }
          const scalar_t* gr = g.data();
          block_outer_add(a, gr, xr, C);
          scalar_t* db = a + kBlock * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) db[c] += gr[c];
        }
      }
      // the gates: their gradients add to both inputs' and sum into their weights'
      const scalar_t* wc = gwc.data_ptr<scalar_t>();
      const scalar_t* wm = gwm.data_ptr<scalar_t>();
      const scalar_t* igp = dig.data_ptr<scalar_t>();
      const scalar_t* fgp = dfg.data_ptr<scalar_t>();
      scalar_t* awc = acc + gates_at;
      scalar_t* awm = awc + G * C;
      scalar_t* ab = awm + G * C;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t b = idx / T, t = idx % T;
        const scalar_t* __restrict__ xcr = xc.data_ptr<scalar_t>() + b * xc.stride(0) + t * xc.stride(1);
        const scalar_t* __restrict__ xmr = xm.data_ptr<scalar_t>() + b * xm.stride(0) + t * xm.stride(1);
        scalar_t* __restrict__ dxcr = dxc.data_ptr<scalar_t>() + idx * C;
        scalar_t* __restrict__ dxmr = dxm.data_ptr<scalar_t>() + idx * C;
        for (int64_t j = 0; j < G; ++j) {
          const int64_t head = j < NH ? j : j - NH;
          const scalar_t dg = (j < NH ? igp : fgp)[(b * NH + head) * T + t];
          const scalar_t* __restrict__ wcj = wc + j * C;
          const scalar_t* __restrict__ wmj = wm + j * C;
          scalar_t* __restrict__ awcj = awc + j * C;
          scalar_t* __restrict__ awmj = awm + j * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dxcr[c] += dg * wcj[c];
            dxmr[c] += dg * wmj[c];
            awcj[c] += dg * xcr[c];
            awmj[c] += dg * xmr[c];
          }
          ab[j] += dg;
        }
      }
    });
    sums.reduce_into(sums_out.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> out = {dxc, dxm};
  // row o, channel c = 4 blk + i -> dW[blk, o, i]
  for (int p = 0; p < 3; ++p) {
    auto rows = sums_out.narrow(0, p * per, kBlock * C);
    out.push_back(rows.view({kBlock, NB, kBlock}).permute({1, 0, 2}).contiguous());
  }
  // (clones: the outputs may not be views of one buffer)
  for (int p = 0; p < 3; ++p) out.push_back(sums_out.narrow(0, p * per + kBlock * C, C).clone());
  out.push_back(sums_out.narrow(0, gates_at, G * C).view({G, C}).t().contiguous());
  out.push_back(sums_out.narrow(0, gates_at + G * C, G * C).view({G, C}).t().contiguous());
  out.push_back(sums_out.narrow(0, gates_at + 2 * G * C, G).clone());
  return out;
}

// The input and forget gates read [q, k, v] (gate_w (G, 3 C), G = 2 NH, input gates first; gate_b (G)); q, k, v are
// the 4 x 4 block-diagonal maps (wq, wk, wv (C / 4, 4, 4) as (out, in); bq, bk, bv (C) or undefined) of xc, xc, xm,
// so the gates are linear in xc and xm: -> [gate_wc, gate_wm (C, G), gate_b (G)], the weights cell_inputs_forward
// takes. A few thousand multiply-adds: one thread, in the order of the Python form (ViLLayer._folded_gate_weights).
std::vector<at::Tensor> fold_gate_weights(const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                                          const c10::optional<at::Tensor>& bq, const c10::optional<at::Tensor>& bk,
                                          const c10::optional<at::Tensor>& bv, const at::Tensor& gate_w,
                                          const at::Tensor& gate_b) {
  RECORD_FUNCTION("vilseg::fold_gate_weights", std::vector<c10::IValue>());
  const int64_t NB = wq.size(0), C = NB * kBlock, G = gate_w.size(0);
  TORCH_CHECK(gate_w.dim() == 2 && gate_w.size(1) == 3 * C, "gate_w must be (G, 3 C)");
  const at::Tensor* ws[3] = {&wq, &wk, &wv};
  const c10::optional<at::Tensor>* bs[3] = {&bq, &bk, &bv};
  for (int p = 0; p < 3; ++p) {
    TORCH_CHECK(ws[p]->is_contiguous() && ws[p]->sizes() == wq.sizes() && ws[p]->size(1) == kBlock &&
                    ws[p]->size(2) == kBlock && ws[p]->scalar_type() == gate_w.scalar_type(),
                "block weights must be contiguous (C / 4, 4, 4) of gate_w's dtype");
    check_vector(*bs[p], C, gate_w.scalar_type(), "projection bias");
  }
  check_vector(gate_b, G, gate_w.scalar_type(), "gate_b");
  // (3 C, G): the gates innermost, as in the results, so that every inner loop runs over contiguous gates
  auto gt = gate_w.t().contiguous();
  auto wc = at::zeros({C, G}, gt.options()), wm = at::zeros({C, G}, gt.options());
  auto bias = gate_b.clone();
  dispatch_floating(gt.scalar_type(), "fold_gate_weights", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* outs[3] = {wc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), wm.data_ptr<scalar_t>()};
    scalar_t* __restrict__ bo = bias.data_ptr<scalar_t>();
    for (int p = 0; p < 3; ++p) {
      const scalar_t* w = ws[p]->data_ptr<scalar_t>();
      const scalar_t* bp = *bs[p] ? (*bs[p])->data_ptr<scalar_t>() : nullptr;
      const scalar_t* gp = gt.data_ptr<scalar_t>() + p * C * G;  // the gates' weights on projection p's outputs
      for (int64_t blk = 0; blk < NB; ++blk)
        for (int64_t o = 0; o < kBlock; ++o) {
          const int64_t c = blk * kBlock + o;
          const scalar_t* __restrict__ gc = gp + c * G;
          for (int64_t i = 0; i < kBlock; ++i) {
            const scalar_t wv = w[c * kBlock + i];
            scalar_t* __restrict__ out = outs[p] + (blk * kBlock + i) * G;
            for (int64_t j = 0; j < G; ++j) out[j] += wv * gc[j];
          }
          if (bp)
            for (int64_t j = 0; j < G; ++j) bo[j] += gc[j] * bp[c];
        }
    }
  });
  return {wc, wm, bias};
}

// Backward of fold_gate_weights: d gate_wc, d gate_wm (C, G), d gate_b (G) -> [dwq, dwk, dwv (C / 4, 4, 4), dbq, dbk,
// dbv (C; undefined where the bias is), d gate_w (G, 3 C), d gate_b (G)].
std::vector<at::Tensor> fold_gate_weights_backward(const at::Tensor& d_wc, const at::Tensor& d_wm,
                                                   const at::Tensor& d_b, const at::Tensor& wq, const at::Tensor& wk,
                                                   const at::Tensor& wv, const c10::optional<at::Tensor>& bq,
                                                   const c10::optional<at::Tensor>& bk,
                                                   const c10::optional<at::Tensor>& bv, const at::Tensor& gate_w) {
  RECORD_FUNCTION("vilseg::fold_gate_weights_backward", std::vector<c10::IValue>());
  const int64_t NB = wq.size(0), C = NB * kBlock, G = gate_w.size(0);
  TORCH_CHECK(d_wc.sizes() == d_wm.sizes() && d_wc.size(0) == C && d_wc.size(1) == G && d_b.numel() == G,
              "gradients must be (C, G), (C, G), (G)");
  const at::Tensor* ws[3] = {&wq, &wk, &wv};
  const c10::optional<at::Tensor>* bs[3] = {&bq, &bk, &bv};
  // the gates innermost, as in fold_gate_weights: the gate weights and their gradient as (3 C, G)
  auto gt = gate_w.t().contiguous();
  const at::Tensor dfold[3] = {d_wc.contiguous(), d_wc.contiguous(), d_wm.contiguous()};
  auto db_c = d_b.contiguous();
  auto d_gt = at::empty_like(gt);
  std::vector<at::Tensor> dws, dbs;
  dispatch_floating(gt.scalar_type(), "fold_gate_weights_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* __restrict__ dbp = db_c.data_ptr<scalar_t>();
    for (int p = 0; p < 3; ++p) {
      const scalar_t* w = ws[p]->data_ptr<scalar_t>();
      const scalar_t* bp = *bs[p] ? (*bs[p])->data_ptr<scalar_t>() : nullptr;
      const scalar_t* df = dfold[p].data_ptr<scalar_t>();
      const scalar_t* gp = gt.data_ptr<scalar_t>() + p * C * G;
      scalar_t* dgp = d_gt.data_ptr<scalar_t>() + p * C * G;
      auto dw = at::empty_like(*ws[p]);
      scalar_t* dwp = dw.data_ptr<scalar_t>();
      at::Tensor dbias = bp ? at::empty({C}, gt.options()) : at::Tensor();
      scalar_t* dbo = bp ? dbias.data_ptr<scalar_t>() : nullptr;
      for (int64_t blk = 0; blk < NB; ++blk)
        for (int64_t o = 0; o < kBlock; ++o) {
          const int64_t c = blk * kBlock + o;
          const scalar_t* __restrict__ gc = gp + c * G;
          scalar_t* __restrict__ dgc = dgp + c * G;
          for (int64_t j = 0; j < G; ++j) dgc[j] = bp ? bp[c] * dbp[j] : scalar_t(0);
          for (int64_t i = 0; i < kBlock; ++i) {
            const scalar_t* __restrict__ d = df + (blk * kBlock + i) * G;
            const scalar_t wv = w[c * kBlock + i];
            scalar_t s = 0;
            for (int64_t j = 0; j < G; ++j) {
              dgc[j] += wv * d[j];
              s += gc[j] * d[j];
            }
            dwp[c * kBlock + i] = s;
          }
          if (dbo) {
            scalar_t s = 0;
            for (int64_t j = 0; j < G; ++j) s += gc[j] * dbp[j];
            dbo[c] = s;
          }
        }
      dws.push_back(dw);
      dbs.push_back(dbias);
    }
  });
  return {dws[0], dws[1], dws[2], dbs[0], dbs[1], dbs[2], d_gt.t().contiguous(), db_c.clone()};
}
