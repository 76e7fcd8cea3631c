// The chunkwise mLSTM kernel's forward and backward (vilseg/ops/mlstm.py, _ChunkwiseMLSTM) in C++: the same
// arithmetic as the Python form, chunk by chunk. Each thread takes a range of chunks and runs one chunk's products
// (small matrices, through oneDNN's brgemm or BLAS) and the element-wise work around them (the intra-chunk decay, the
// normaliser, the gradients at the output, the gate terms) back to back while its operands sit in cache, instead of
// one pass over all chunks per operator; the inter-chunk state scan between the passes is ATen's. Written here because
// eagerly the Python form is a dozen PyTorch operators per step on small tensors, whose dispatch and memory traffic
// cost more than their arithmetic. CPU, float32 / float64, no autocast (the Python form serves everything else).
// Shapes as in mlstm.py: q, k (B, NH, NC, L, DH), v (B, NH, NC, L, DHV), gates (B, NH, NC, L), all contiguous.
#include "native_common.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace {

using namespace vilseg_native;

// The Python form's STATE_GROUP: chunks per group of the two-level state scan.
constexpr int64_t kStateGroup = 16;

struct ChunkGates {
  at::Tensor b, g, u, m_loc;
};

// Within-chunk log-decays (mlstm.py's _chunk_gates): b the cumulative log forget gate inside each chunk, g = b at
// the chunk end (B, NH, NC), u = exp(g - b + ig - m_loc) * scale with m_loc the chunk's maximum of g - b + ig.
ChunkGates chunk_gates(const at::Tensor& ig, const at::Tensor& fg, double scale) {
  const int64_t L = ig.size(-1), rows = ig.numel() / L;
  ChunkGates out{at::empty_like(ig), at::empty(ig.sizes().slice(0, 3), ig.options()), at::empty_like(ig),
                 at::empty(ig.sizes().slice(0, 3), ig.options())};
  dispatch_floating(ig.scalar_type(), "chunk_gates", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* igp = ig.data_ptr<scalar_t>();
    const scalar_t* fgp = fg.data_ptr<scalar_t>();
    scalar_t* bp = out.b.data_ptr<scalar_t>();
    scalar_t* gp = out.g.data_ptr<scalar_t>();
    scalar_t* up = out.u.data_ptr<scalar_t>();
    scalar_t* mp = out.m_loc.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* f = fgp + r * L;
        const scalar_t* i = igp + r * L;
        scalar_t* b = bp + r * L;
        scalar_t* u = up + r * L;
        double acc = 0;  // as torch.cumsum on CPU: accumulated in double
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t x = f[l];
          acc += std::min(x, scalar_t(0)) - std::log1p(std::exp(-std::abs(x)));  // logsigmoid
          b[l] = static_cast<scalar_t>(acc);
        }
        const scalar_t g = b[L - 1];
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t l = 0; l < L; ++l) {
          u[l] = g - b[l] + i[l];
          m = std::max(m, u[l]);
        }
        for (int64_t l = 0; l < L; ++l) u[l] = std::exp(u[l] - m) * static_cast<scalar_t>(scale);
        gp[r] = g;
        mp[r] = m;
      }
    });
  });
  return out;
}

// The inter-chunk recurrence of one group of G chunks as one stabilised (G + 1) x (G + 1) matrix per head
// (mlstm.py's _state_weights): g, m_loc (B, NH, G), m0 (B, NH) -> [A (B, NH, G + 1, G + 1), m_state (B, NH, G + 1)].
std::vector<at::Tensor> state_weights(const at::Tensor& g, const at::Tensor& m_loc, const at::Tensor& m0) {
  const int64_t G = g.size(-1), T = G + 1, rows = g.numel() / G;
  auto gc = g.contiguous(), mc = m_loc.contiguous(), m0c = m0.contiguous();
  auto a = at::empty({g.size(0), g.size(1), T, T}, g.options());
  auto m_state = at::empty({g.size(0), g.size(1), T}, g.options());
  dispatch_floating(g.scalar_type(), "state_weights", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* m0p = m0c.data_ptr<scalar_t>();
    scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* sp = m_state.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {  // (a few hundred values per head: no threads)
      const scalar_t* y = gp + r * G - 1;  // y[k] = g[k - 1] for k >= 1 (y[0] = 0 is never summed)
      scalar_t* ar = ap + r * T * T;
      for (int64_t c = 0; c < T; ++c) {
        scalar_t* row = ar + c * T;
        scalar_t m = -std::numeric_limits<scalar_t>::infinity();
        for (int64_t j = 0; j <= c; ++j) {
          double seg = 0;  // sum of y over (j, c], in order, in double (as the Python form's cumsum)
          for (int64_t k = j + 1; k <= c; ++k) seg += y[k];
          row[j] = static_cast<scalar_t>(seg) + (j == 0 ? m0p[r] : mp[r * G + j - 1]);
          m = std::max(m, row[j]);
        }
        for (int64_t j = 0; j <= c; ++j) row[j] = std::exp(row[j] - m);
        for (int64_t j = c + 1; j < T; ++j) row[j] = 0;
        sp[r * T + c] = m;
      }
    }
  });
  return {a, m_state};
}

// BLAS's Fortran gemm (MKL in PyTorch's x86 wheels, which export it); weak, so that a PyTorch without it still loads
// this extension (the products then take ATen's mm).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// Whether oneDNN's small-matrix kernels (ATen's cpublas::brgemm: JIT-compiled, for operands in cache) serve float32
// products here: PyTorch builds them in only on some platforms, so the first use tries one.
bool float_brgemm_available() {
  static const bool available = [] {
    try {
      float a[1] = {1}, b[1] = {1}, c[1] = {0};
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 1.0f;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return available;
}

// Row-major C (M x N, leading dimension ldc) = op(A) B with op(A) = A (M x K, lda), or A^T for A stored K x M where
// `ta`, and B (K x N, ldb), added to C where `accumulate`: one chunk's product on the calling thread (the callers'
// threads split the chunks; BLAS called inside a parallel region runs on one thread). float32 A B through oneDNN's
// brgemm where available (JIT kernels for operands in cache; callers release it at the end of their range,
// brgemm_done), everything else through BLAS (column-major: it computes C^T = B^T op(A)^T; its kernels for a
// transposed A run about as fast as brgemm's, those for a transposed B at half that speed, so no product here takes
// one), else ATen's mm.
template <typename scalar_t>
void matmul(bool ta, int64_t M, int64_t N, int64_t K, const scalar_t* a, int64_t lda, const scalar_t* b, int64_t ldb,
            scalar_t* c, int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!ta && float_brgemm_available()) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, a, b, c, false);
      return;
    }
  }
  const bool have_blas = std::is_same_v<scalar_t, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  if (have_blas) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K), la = static_cast<int>(lda),
              lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    const scalar_t one = 1, beta = accumulate ? 1 : 0;
    const char* opa = ta ? "T" : "N";
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_("N", opa, &m, &n, &k, &one, b, &lb, a, &la, &beta, c, &lc);
    } else {
      dgemm_("N", opa, &m, &n, &k, &one, b, &lb, a, &la, &beta, c, &lc);
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto a_mat = at::from_blob(const_cast<scalar_t*>(a), ta ? at::IntArrayRef{K, M} : at::IntArrayRef{M, K}, {lda, 1},
                             options);
  auto product = at::mm(ta ? a_mat.t() : a_mat, at::from_blob(const_cast<scalar_t*>(b), {K, N}, {ldb, 1}, options));
  auto out = at::from_blob(c, {M, N}, {ldc, 1}, options);
  accumulate ? out.add_(product) : out.copy_(product);
}

// The end of a thread's products (oneDNN's brgemm keeps per-thread state between calls).
inline void brgemm_done() {
  if (float_brgemm_available()) at::native::cpublas::brgemm_release(false);
}

// dst (cols x rows) = src^T for src (rows x cols, leading dimension ld). float32 in 8 x 8 register blocks where AVX
// is there (element by element, a transpose costs as much as the product it feeds).
template <typename scalar_t>
void transpose_into(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t rows, int64_t cols,
                    int64_t ld) {
  int64_t r_done = 0, c_done = 0;  // the corner [0, r_done) x [0, c_done) that the blocks covered
#if defined(__AVX__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    r_done = rows / 8 * 8;
    c_done = cols / 8 * 8;
    for (int64_t r0 = 0; r0 < r_done; r0 += 8) {
      for (int64_t c0 = 0; c0 < c_done; c0 += 8) {
        __m256 x[8], y[8];
        for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(src + (r0 + i) * ld + c0);
        for (int i = 0; i < 8; i += 2) {
          y[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
          y[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
          x[i] = _mm256_shuffle_ps(y[i], y[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
          x[i + 1] = _mm256_shuffle_ps(y[i], y[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
          x[i + 2] = _mm256_shuffle_ps(y[i + 1], y[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
          x[i + 3] = _mm256_shuffle_ps(y[i + 1], y[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(dst + (c0 + i) * rows + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x20));
          _mm256_storeu_ps(dst + (c0 + i + 4) * rows + r0, _mm256_permute2f128_ps(x[i], x[i + 4], 0x31));
        }
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = (r < r_done ? c_done : 0); c < cols; ++c) dst[c * rows + r] = src[r * ld + c];
}

// The intra-chunk decay of one chunk (L tokens; b its cumulative log forget gate, ig its input gates, mi the entering
// state's stabiliser): e(t, j) = exp(b(t) - b(j) + ig(j) - m(t)) for j <= t, 0 above the diagonal, into `e` (L x L),
// with the per-token stabiliser m = max(b + mi, max over j <= t of b(t) - b(j) + ig(j)) computed into m where
// `compute_m`, else read from it (backward: forward's m), and the entering state's weight w_inter = exp(b + mi - m).
// mlstm.py's _intra_weights without the product.
template <typename scalar_t>
void intra_decay(scalar_t* __restrict__ e, const scalar_t* __restrict__ b, const scalar_t* __restrict__ ig,
                 scalar_t mi, scalar_t* __restrict__ m, bool compute_m, scalar_t* __restrict__ w_inter, int64_t L) {
  for (int64_t t = 0; t < L; ++t) {
    // log D(t, j) = (b(t) - b(j)) + ig(j) in this order, as the Python form: b(t) - b(j) of nearby tokens cancels
    // exactly, where b(t) + (ig(j) - b(j)) would round at the scale of the cumulative decay
    const scalar_t bt = b[t];
    scalar_t mt;
    if (compute_m) {
      scalar_t mx = bt + mi;
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, (bt - b[j]) + ig[j]);
      mt = mx;
      m[t] = mt;
    } else {
      mt = m[t];
    }
    w_inter[t] = std::exp(bt + mi - mt);
    scalar_t* __restrict__ row = e + t * L;
#pragma omp simd
    for (int64_t j = 0; j <= t; ++j) row[j] = exp_((bt - b[j]) + ig[j] - mt);
    for (int64_t j = t + 1; j < L; ++j) row[j] = 0;
  }
}

// s <- (s + add(t)) * e * scale on one chunk's L x L matrix (add may be null: no addend; e zero above the diagonal).
template <typename scalar_t>
void weigh_intra(scalar_t* __restrict__ s, const scalar_t* __restrict__ e, const scalar_t* __restrict__ add,
                 scalar_t scale, int64_t L) {
  for (int64_t t = 0; t < L; ++t) {
    scalar_t* __restrict__ row = s + t * L;
    const scalar_t* __restrict__ er = e + t * L;
    const scalar_t a = add ? add[t] : scalar_t(0);
#pragma omp simd
    for (int64_t j = 0; j <= t; ++j) row[j] = (row[j] + a) * er[j] * scale;
    for (int64_t j = t + 1; j < L; ++j) row[j] = 0;
  }
}

// Scratch of one parallel range: a buffer of the calling thread, kept for its next call, so that the threads of a
// parallel range allocate nothing (blocks allocated on a worker thread come from that thread's malloc arena, which
// then keeps hundreds of MiB over a large image's step: measured), 64-byte aligned (the BLAS kernels' results must
// not depend on where a block happens to start: the same inputs give the same bits from call to call). One alive per
// thread at a time.
template <typename scalar_t>
class Scratch {
 public:
  // room for `blocks` (element counts), handed out in order by take()
  explicit Scratch(std::initializer_list<int64_t> blocks) {
    TORCH_INTERNAL_ASSERT(!in_use(), "Scratch: one per thread at a time");
    in_use() = true;
    int64_t total = 0;
    for (int64_t n : blocks) total += padded(n);
    auto& buffer = storage();
    if (buffer.size() < static_cast<size_t>(total + 16)) buffer.resize(total + 16);
    const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
    next_ = buffer.data() + ((64 - address % 64) % 64) / sizeof(scalar_t);
    end_ = next_ + total;
  }
  ~Scratch() { in_use() = false; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  scalar_t* take(int64_t n) {
    scalar_t* p = next_;
    next_ += padded(n);
    TORCH_INTERNAL_ASSERT(next_ <= end_, "Scratch: more taken than the blocks declared");
    return p;
  }

 private:
  // each block on a 64-byte boundary (16 floats; 8 doubles stay aligned too)
  static int64_t padded(int64_t n) { return (n + 15) / 16 * 16; }
  static std::vector<scalar_t>& storage() {
    thread_local std::vector<scalar_t> buffer;
    return buffer;
  }
  static bool& in_use() {
    thread_local bool flag = false;
    return flag;
  }
  scalar_t* next_;
  scalar_t* end_;
};

// States from the chunks' own contributions `local` (B, NH, G, *X) and the initial state (B, NH, *X) or undefined
// (zero) through A of state_weights: [entering each chunk (B, NH, G, *X), after the group (B, NH, *X)]
// (mlstm.py's _states).
std::pair<at::Tensor, at::Tensor> group_states(const at::Tensor& a, const at::Tensor& local,
                                               const c10::optional<at::Tensor>& initial) {
  const int64_t B = local.size(0), NH = local.size(1), G = local.size(2);
  auto flat = local.reshape({B, NH, G, -1});
  auto entering = at::matmul(a.narrow(-2, 0, G).narrow(-1, 1, G), flat);
  auto final = at::matmul(a.narrow(-2, G, 1).narrow(-1, 1, G), flat);
  if (initial) {
    auto init = initial->reshape({B * NH, 1, -1});
    entering.view({B * NH, G, -1}).baddbmm_(a.narrow(-2, 0, G).narrow(-1, 0, 1).reshape({B * NH, G, 1}), init);
    final.view({B * NH, 1, -1}).baddbmm_(a.narrow(-2, G, 1).narrow(-1, 0, 1).reshape({B * NH, 1, 1}), init);
  }
  auto final_shape = local.sizes().vec();
  final_shape.erase(final_shape.begin() + 2);
  return {entering.view(local.sizes()), final.view(final_shape)};
}

// States (C, n, m) entering every chunk and after the last one from the chunks' contributions kv (B, NH, NC, DH,
// DHV) and nk (B, NH, NC, DH), through groups of kStateGroup chunks (mlstm.py's _scan_states) -> [c_in, n_in, m_in,
// c_final, n_final, m_final].
std::vector<at::Tensor> scan_states(const at::Tensor& g, const at::Tensor& m_loc, const at::Tensor& m0,
                                    const at::Tensor& kv, const at::Tensor& nk, const c10::optional<at::Tensor>& c0,
                                    const c10::optional<at::Tensor>& n0) {
  const int64_t NC = g.size(-1);
  if (NC <= kStateGroup) {
    auto aw = state_weights(g, m_loc, m0);
    auto [c_in, c_final] = group_states(aw[0], kv, c0);
    auto [n_in, n_final] = group_states(aw[0], nk, n0);
    return {c_in, n_in, aw[1].narrow(-1, 0, NC), c_final, n_final, aw[1].select(-1, NC)};
  }
  auto c_in = at::empty_like(kv), n_in = at::empty_like(nk), m_in = at::empty_like(g);
  c10::optional<at::Tensor> c_state = c0, n_state = n0;
  at::Tensor m_state = m0;
  for (int64_t start = 0; start < NC; start += kStateGroup) {
    const int64_t G = std::min(kStateGroup, NC - start);
    auto aw = state_weights(g.narrow(-1, start, G), m_loc.narrow(-1, start, G), m_state);
    auto [ce, cf] = group_states(aw[0], kv.narrow(2, start, G), c_state);
    auto [ne, nf] = group_states(aw[0], nk.narrow(2, start, G), n_state);
    c_in.narrow(2, start, G).copy_(ce);
    n_in.narrow(2, start, G).copy_(ne);
    m_in.narrow(-1, start, G).copy_(aw[1].narrow(-1, 0, G));
    c_state = cf;
    n_state = nf;
    m_state = aw[1].select(-1, G);
  }
  return {c_in, n_in, m_in, *c_state, *n_state, m_state};
}

// Transpose of scan_states (mlstm.py's _scan_states_backward): [dkv, dnk, d c0, d n0] (the last two undefined without
// an initial state) from the gradients of the entering states and of the final state (either may be undefined).
std::vector<at::Tensor> scan_states_backward(const at::Tensor& g, const at::Tensor& m_loc, const at::Tensor& m_in,
                                             const at::Tensor& dc_in, const at::Tensor& dn_in,
                                             const at::Tensor& dc_final, const at::Tensor& dn_final, bool initial) {
  const int64_t B = g.size(0), NH = g.size(1), NC = g.size(2);
  const bool single = NC <= kStateGroup;
  at::Tensor dkv, dnk;
  if (!single) {
    dkv = at::empty_like(dc_in);
    dnk = at::empty_like(dn_in);
  }
  at::Tensor d_c = dc_final, d_n = dn_final;  // gradient of the state after the current group
  const int64_t last = (NC - 1) / kStateGroup * kStateGroup;
  for (int64_t start = last; start >= 0; start -= kStateGroup) {
    const int64_t G = std::min(kStateGroup, NC - start);
    auto a = state_weights(g.narrow(-1, start, G), m_loc.narrow(-1, start, G), m_in.select(-1, start))[0];
    auto a_t = a.transpose(-2, -1).reshape({B * NH, G + 1, G + 1});  // column J of A: how source J reaches all
    at::Tensor grads[2], befores[2];
    const at::Tensor* entering[2] = {&dc_in, &dn_in};
    const at::Tensor* after_grads[2] = {&d_c, &d_n};
    for (int i = 0; i < 2; ++i) {
      auto d_entering = entering[i]->narrow(2, start, G);
      auto flat = d_entering.reshape({B * NH, G, -1});
      at::Tensor after = after_grads[i]->defined() ? after_grads[i]->reshape({B * NH, 1, -1}) : at::Tensor();
      auto grad = at::bmm(a_t.narrow(1, 1, G).narrow(2, 0, G), flat);
      if (after.defined()) grad.baddbmm_(a_t.narrow(1, 1, G).narrow(2, G, 1), after);
      grads[i] = grad.view(d_entering.sizes());
      if (start > 0 || initial) {
        auto before = at::bmm(a_t.narrow(1, 0, 1).narrow(2, 0, G), flat);
        if (after.defined()) before.baddbmm_(a_t.narrow(1, 0, 1).narrow(2, G, 1), after);
        auto shape = d_entering.sizes().vec();
        shape.erase(shape.begin() + 2);
        befores[i] = before.view(shape);
      }
    }
    if (single) {
      dkv = grads[0];
      dnk = grads[1];
    } else {
      dkv.narrow(2, start, G).copy_(grads[0]);
      dnk.narrow(2, start, G).copy_(grads[1]);
    }
    d_c = befores[0];
    d_n = befores[1];
  }
  return {dkv, dnk, d_c, d_n};
}

// The forget gates' gradient from the per-token d_cum (B, NH, NC, L) of the cumulative log forget gate: its reverse
// cumulative sum over the whole sequence (accumulated in double, as torch.cumsum on CPU; d_end added at the last
// token: the gradient through the final state, (B, NH) or undefined) times d logsigmoid(f) = sigmoid(-f).
at::Tensor forget_gate_gradient(const at::Tensor& d_cum, const at::Tensor& fg, const at::Tensor& d_end) {
  const int64_t S = d_cum.size(2) * d_cum.size(3), rows = d_cum.numel() / S;
  auto dfg = at::empty_like(fg);
  auto d_end_c = d_end.defined() ? d_end.contiguous() : d_end;
  dispatch_floating(fg.scalar_type(), "forget_gate_gradient", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* dp = d_cum.data_ptr<scalar_t>();
    const scalar_t* fp = fg.data_ptr<scalar_t>();
    const scalar_t* ep = d_end_c.defined() ? d_end_c.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = dfg.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {  // (a few thousand values: no threads)
      double acc = ep ? static_cast<double>(ep[r]) : 0.0;
      for (int64_t t = S - 1; t >= 0; --t) {
        acc += dp[r * S + t];
        op[r * S + t] = static_cast<scalar_t>(acc) * sigmoid(-fp[r * S + t]);
      }
    }
  });
  return dfg;
}

}  // namespace

// Forward of the chunkwise kernel. With `intra` false (a replayed record) only the chunk states: [c_in, n_in, m_in,
// c_final, n_final, m_final]; else also [h (B, NH, NC, L, DHV), denom, normaliser, m (B, NH, NC, L)] after them.
// Chunk by chunk: each chunk's products and the element-wise work around them run on one thread while its operands
// sit in cache, in two passes (the chunks' own state contributions, then their outputs) around the state scan.
std::vector<at::Tensor> chunkwise_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& ig, const at::Tensor& fg,
                                          const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& n0,
                                          const at::Tensor& m0, double eps, bool intra) {
  RECORD_FUNCTION("vilseg::chunkwise_forward", std::vector<c10::IValue>());  // (a profiler sees it as an operator)
  const int64_t B = q.size(0), NH = q.size(1), NC = q.size(2), L = q.size(3), DH = q.size(4), DHV = v.size(4);
  const int64_t N = B * NH * NC;
  for (const auto* t : {&q, &k, &v, &ig, &fg})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "chunkwise_forward: contiguous CPU tensors of one dtype expected");
  const double scale = 1.0 / std::sqrt(static_cast<double>(DH));
  auto gates = chunk_gates(ig, fg, scale);
  auto kv = at::empty({B, NH, NC, DH, DHV}, q.options());
  auto nk = at::empty({B, NH, NC, DH}, q.options());
  at::Tensor h, denom, normaliser, m;
  if (intra) {
    h = at::empty({B, NH, NC, L, DHV}, q.options());
    denom = at::empty_like(ig), normaliser = at::empty_like(ig), m = at::empty_like(ig);
  }
  std::vector<at::Tensor> states;
  dispatch_floating(q.scalar_type(), "chunkwise_forward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* up = gates.u.data_ptr<scalar_t>();
    scalar_t* kvp = kv.data_ptr<scalar_t>();
    scalar_t* nkp = nk.data_ptr<scalar_t>();
    // each chunk's contribution to the state after it: kv = (k * u)^T v, nk = the sum of k * u
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch({L * DH});
      scalar_t* ku = scratch.take(L * DH);
      for (int64_t n = begin; n < end; ++n) {
        scalar_t* __restrict__ sum = nkp + n * DH;
#pragma omp simd
        for (int64_t d = 0; d < DH; ++d) sum[d] = 0;
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t* __restrict__ kr = kp + (n * L + t) * DH;
          scalar_t* __restrict__ o = ku + t * DH;
          const scalar_t w = up[n * L + t];
#pragma omp simd
          for (int64_t d = 0; d < DH; ++d) {
            o[d] = kr[d] * w;
            sum[d] += o[d];
          }
        }
        matmul<scalar_t>(true, DH, DHV, L, ku, DH, vp + n * L * DHV, DHV, kvp + n * DH * DHV, DHV, false);
      }
      brgemm_done();
    });
    states = scan_states(gates.g, gates.m_loc, m0, kv, nk, c0, n0);
    if (!intra) return;
    const auto m_in = states[2].contiguous();  // (a view of the state stabilisers)
    const scalar_t* cip = states[0].data_ptr<scalar_t>();
    const scalar_t* nip = states[1].data_ptr<scalar_t>();
    const scalar_t* mip = m_in.data_ptr<scalar_t>();
    const scalar_t* bp = gates.b.data_ptr<scalar_t>();
    const scalar_t* igp = ig.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* dp = denom.data_ptr<scalar_t>();
    scalar_t* np = normaliser.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale), e = static_cast<scalar_t>(eps);
    // each chunk's output: P = scale (q k^T) * decay, N = P v + (q * w_inter) C_in, D = P 1 + (q * w_inter) . n_in,
    // h = N / (max(|D|, exp(-m)) + eps)
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch({L * L, L * DH, L * L, L * DH, L});
      scalar_t* s = scratch.take(L * L);
      scalar_t* k_t = scratch.take(L * DH);
      scalar_t* decay = scratch.take(L * L);
      scalar_t* qw = scratch.take(L * DH);
      scalar_t* w_inter = scratch.take(L);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* qn = qp + n * L * DH;
        const scalar_t* ni = nip + n * DH;
        scalar_t* hn = hp + n * L * DHV;
        transpose_into(k_t, kp + n * L * DH, L, DH, DH);
        matmul<scalar_t>(false, L, L, DH, qn, DH, k_t, L, s, L, false);
        intra_decay(decay, bp + n * L, igp + n * L, mip[n], mp + n * L, true, w_inter, L);
        weigh_intra<scalar_t>(s, decay, nullptr, sc, L);
        matmul<scalar_t>(false, L, DHV, L, s, L, vp + n * L * DHV, DHV, hn, DHV, false);
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t* __restrict__ qr = qn + t * DH;
          scalar_t* __restrict__ o = qw + t * DH;
          const scalar_t w = w_inter[t];
          scalar_t q_n = 0;
#pragma omp simd reduction(+ : q_n)
          for (int64_t d = 0; d < DH; ++d) {
            o[d] = qr[d] * w;
            q_n += o[d] * ni[d];
          }
          const scalar_t* __restrict__ row = s + t * L;
          scalar_t rs = 0;
#pragma omp simd reduction(+ : rs)
          for (int64_t j = 0; j < L; ++j) rs += row[j];
          const scalar_t den = rs + q_n;
          dp[n * L + t] = den;
          np[n * L + t] = std::max(std::abs(den), std::exp(-mp[n * L + t])) + e;
        }
        matmul<scalar_t>(false, L, DHV, DH, qw, DH, cip + n * DH * DHV, DHV, hn, DHV, true);
        for (int64_t t = 0; t < L; ++t) {
          scalar_t* __restrict__ hr = hn + t * DHV;
          const scalar_t nt = np[n * L + t];
#pragma omp simd
          for (int64_t d = 0; d < DHV; ++d) hr[d] /= nt;
        }
      }
      brgemm_done();
    });
  });
  if (intra) states.insert(states.end(), {h, denom, normaliser, m});
  return states;
}

// Backward of chunkwise_forward (mlstm.py's _ChunkwiseMLSTM.backward): dh (B, NH, NC, L, DHV), d c_final, d n_final
// (each may be undefined) -> [dq, dk, dv, d ig, d fg, d c0, d n0] (the last two undefined without an initial state).
// Chunk by chunk as forward, in two passes around the transposed state scan.
std::vector<at::Tensor> chunkwise_backward(const c10::optional<at::Tensor>& dh_opt,
                                           const c10::optional<at::Tensor>& dc_final_opt,
                                           const c10::optional<at::Tensor>& dn_final_opt, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& ig,
                                           const at::Tensor& fg,
                                           const at::Tensor& c_in, const at::Tensor& n_in, const at::Tensor& m_in,
                                           const at::Tensor& c_final, const at::Tensor& n_final, const at::Tensor& h,
                                           const at::Tensor& denom, const at::Tensor& normaliser, const at::Tensor& m,
                                           bool initial) {
  RECORD_FUNCTION("vilseg::chunkwise_backward", std::vector<c10::IValue>());
  const int64_t B = q.size(0), NH = q.size(1), NC = q.size(2), L = q.size(3), DH = q.size(4), DHV = v.size(4);
  const int64_t N = B * NH * NC;
  const double scale = 1.0 / std::sqrt(static_cast<double>(DH));
  const at::Tensor dc_final_in = dc_final_opt.value_or(at::Tensor()), dn_final_in = dn_final_opt.value_or(at::Tensor());
  // (no output gradient: only the final state's reaches the inputs; zeros keep one code path)
  const at::Tensor dh = dh_opt && dh_opt->defined() ? dh_opt->contiguous() : at::zeros_like(h);
  auto gates = chunk_gates(ig, fg, scale);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  auto dc_local = at::empty_like(c_in), dn_local = at::empty_like(n_in);
  auto dd_w = at::empty_like(ig);  // the normaliser's gradient times the entering state's weight, per token
  const auto m_in_c = m_in.contiguous(), c_in_c = c_in.contiguous(), n_in_c = n_in.contiguous();
  std::vector<at::Tensor> sb;
  at::Tensor di, dfg;
  dispatch_floating(q.scalar_type(), "chunkwise_backward", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* igp = ig.data_ptr<scalar_t>();
    const scalar_t* bp = gates.b.data_ptr<scalar_t>();
    const scalar_t* up = gates.u.data_ptr<scalar_t>();
    const scalar_t* mip = m_in_c.data_ptr<scalar_t>();
    const scalar_t* cip = c_in_c.data_ptr<scalar_t>();
    const scalar_t* nip = n_in_c.data_ptr<scalar_t>();
    const scalar_t* dhp = dh.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* np = normaliser.data_ptr<scalar_t>();
    const scalar_t* dp = denom.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();  // (read only: forward's stabiliser)
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    scalar_t* dvp = dv.data_ptr<scalar_t>();
    scalar_t* dclp = dc_local.data_ptr<scalar_t>();
    scalar_t* dnlp = dn_local.data_ptr<scalar_t>();
    scalar_t* ddwp = dd_w.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    // intra-chunk (P = scale (q k^T) * decay; N = P v, D = P 1) and the gradients reaching the entering state, which
    // carry its weight w_inter: h = N / n with n = max(|D|, exp(-m)) + eps, m constant
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch({L * L, L * std::max(DH, DHV), DH * DHV, L * L, L * DHV, L * DHV, L, L});
      scalar_t* p = scratch.take(L * L);
      scalar_t* x_t = scratch.take(L * std::max(DH, DHV));  // k^T, then v^T
      scalar_t* c_t = scratch.take(DH * DHV);
      scalar_t* decay = scratch.take(L * L);
      scalar_t* dnum = scratch.take(L * DHV);
      scalar_t* dn_w = scratch.take(L * DHV);
      scalar_t* w_inter = scratch.take(L);
      scalar_t* d_denom = scratch.take(L);
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* qn = qp + n * L * DH;
        const scalar_t* kn = kp + n * L * DH;
        const scalar_t* vn = vp + n * L * DHV;
        intra_decay(decay, bp + n * L, igp + n * L, mip[n], mp + n * L, false, w_inter, L);
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = n * L + t;
          const scalar_t* __restrict__ g = dhp + i * DHV;
          const scalar_t* __restrict__ hr = hp + i * DHV;
          scalar_t* __restrict__ a = dnum + t * DHV;
          scalar_t* __restrict__ bw = dn_w + t * DHV;
          const scalar_t inv = scalar_t(1) / np[i], w = w_inter[t];
          scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < DHV; ++d) {
            dot += g[d] * hr[d];
            const scalar_t x = g[d] * inv;
            a[d] = x;
            bw[d] = x * w;
          }
          const scalar_t den = dp[i];
          const scalar_t sign = den > 0 ? scalar_t(1) : (den < 0 ? scalar_t(-1) : scalar_t(0));
          const scalar_t dd = std::abs(den) >= std::exp(-mp[i]) ? -sign * dot * inv : scalar_t(0);
          d_denom[t] = dd;
          ddwp[i] = dd * w;
        }
        transpose_into(x_t, kn, L, DH, DH);
        matmul<scalar_t>(false, L, L, DH, qn, DH, x_t, L, p, L, false);
        weigh_intra<scalar_t>(p, decay, nullptr, sc, L);
        scalar_t* dvn = dvp + n * L * DHV;
        matmul<scalar_t>(true, L, DHV, L, p, L, dnum, DHV, dvn, DHV, false);  // P^T dN
        // ds = dN v^T -> (ds + dD) * decay * scale, in p's buffer
        transpose_into(x_t, vn, L, DHV, DHV);
        matmul<scalar_t>(false, L, L, DHV, dnum, DHV, x_t, L, p, L, false);
        weigh_intra<scalar_t>(p, decay, d_denom, sc, L);
        scalar_t* dqn = dqp + n * L * DH;
        matmul<scalar_t>(false, L, DH, L, p, L, kn, DH, dqn, DH, false);
        transpose_into(c_t, cip + n * DH * DHV, DH, DHV, DHV);
        matmul<scalar_t>(false, L, DH, DHV, dn_w, DHV, c_t, DH, dqn, DH, true);
        matmul<scalar_t>(true, L, DH, L, p, L, qn, DH, dkp + n * L * DH, DH, false);  // ds^T q
        matmul<scalar_t>(true, DH, DHV, L, qn, DH, dn_w, DHV, dclp + n * DH * DHV, DHV, false);  // q^T dN_w
        scalar_t* __restrict__ dnl = dnlp + n * DH;
#pragma omp simd
        for (int64_t d = 0; d < DH; ++d) dnl[d] = 0;
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t* __restrict__ qr = qn + t * DH;
          const scalar_t a = ddwp[n * L + t];
#pragma omp simd
          for (int64_t d = 0; d < DH; ++d) dnl[d] += a * qr[d];
        }
      }
      brgemm_done();
    });
    // the state gradients through the transposed state weights
    sb = scan_states_backward(gates.g, gates.m_loc, m_in, dc_local, dn_local, dc_final_in, dn_final_in, initial);
    const auto dkv = sb[0].contiguous(), dnk = sb[1].contiguous();
    const scalar_t* dkvp = dkv.data_ptr<scalar_t>();
    const scalar_t* dnkp = dnk.data_ptr<scalar_t>();
    di = at::empty_like(ig);
    auto d_cum = at::empty_like(ig);
    scalar_t* dip = di.data_ptr<scalar_t>();
    scalar_t* dcp = d_cum.data_ptr<scalar_t>();
    // what reaches k and v through the chunk's state contribution kv = (k * u)^T v, nk = sum of k * u; then the
    // gate gradients' dot products: di_s = k_s . dk_s, dF_t = q_t . dq_t - k_t . dk_t
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<scalar_t> scratch({L * DH, L * DHV, DH * DHV});
      scalar_t* ku = scratch.take(L * DH);
      scalar_t* vu = scratch.take(L * DHV);
      scalar_t* dkv_t = scratch.take(DH * DHV);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t w = up[n * L + t];
          const scalar_t* __restrict__ kr = kp + (n * L + t) * DH;
          const scalar_t* __restrict__ vr = vp + (n * L + t) * DHV;
          scalar_t* __restrict__ ko = ku + t * DH;
          scalar_t* __restrict__ vo = vu + t * DHV;
#pragma omp simd
          for (int64_t d = 0; d < DH; ++d) ko[d] = kr[d] * w;
#pragma omp simd
          for (int64_t d = 0; d < DHV; ++d) vo[d] = vr[d] * w;
        }
        const scalar_t* dkvn = dkvp + n * DH * DHV;
        transpose_into(dkv_t, dkvn, DH, DHV, DHV);
        matmul<scalar_t>(false, L, DH, DHV, vu, DHV, dkv_t, DH, dkp + n * L * DH, DH, true);
        matmul<scalar_t>(false, L, DHV, DH, ku, DH, dkvn, DHV, dvp + n * L * DHV, DHV, true);
        const scalar_t* __restrict__ nr = nip + n * DH;
        const scalar_t* __restrict__ dnr = dnkp + n * DH;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = n * L + t;
          const scalar_t* __restrict__ qr = qp + i * DH;
          const scalar_t* __restrict__ kr = kp + i * DH;
          scalar_t* __restrict__ dqr = dqp + i * DH;
          scalar_t* __restrict__ dkr = dkp + i * DH;
          const scalar_t a = ddwp[i], w = up[i];
          scalar_t sq = 0, sk = 0;
#pragma omp simd reduction(+ : sq, sk)
          for (int64_t d = 0; d < DH; ++d) {
            const scalar_t gq = dqr[d] + a * nr[d], gk = dkr[d] + w * dnr[d];
            dqr[d] = gq;
            dkr[d] = gk;
            sq += qr[d] * gq;
            sk += kr[d] * gk;
          }
          dip[i] = sk;
          dcp[i] = sq - sk;
        }
      }
      brgemm_done();
    });
    at::Tensor d_end_decay;  // d loss / d (log-decay up to the last token), through the final state
    for (const auto& [d_final, final] : {std::make_pair(dc_final_in, c_final), std::make_pair(dn_final_in, n_final)}) {
      if (d_final.defined()) {
        auto term = (d_final * final).flatten(2).sum(-1);
        d_end_decay = d_end_decay.defined() ? d_end_decay + term : term;
      }
    }
    // d a = the reverse cumulative sum of dF, times d logsigmoid(f)
    dfg = forget_gate_gradient(d_cum, fg, d_end_decay);
  });
  return {dq, dk, dv, di, dfg, sb[2], sb[3]};
}
