// The chunkwise mLSTM kernel's forward and backward (vilseg/ops/mlstm.py, _ChunkwiseMLSTM) in C++: the same
// arithmetic as the Python form, its matmuls as ATen batched products, the chains of small element-wise operators
// (chunk gates, the intra-chunk decay weights, the state weights, the work on q, k, v and the gradients around the
// matmuls) as single loops. Written here because eagerly each of those chains is a dozen PyTorch operators on small
// tensors, whose dispatch and Python cost more than their arithmetic. CPU, float32 / float64, no autocast (the
// Python form serves everything else).
// Shapes as in mlstm.py: q, k (B, NH, NC, L, DH), v (B, NH, NC, L, DHV), gates (B, NH, NC, L), all contiguous.
#include "native_common.h"

#include <ATen/record_function.h>

#include <algorithm>
#include <limits>

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

// The intra-chunk decay weights applied in place to an (N, L, L) block of chunk matrices s (N = B NH NC):
// s(t, j) <- (s(t, j) + dd(t)) * exp(b(t) - b(j) + ig(j) - m(t)) * scale for j <= t, 0 above the diagonal, with the
// per-token stabiliser m = max(b + m_in, max over j <= t of b(t) - b(j) + ig(j)) (m_in (B, NH, NC) the entering
// state's), computed into m where `compute_m`, else read from it (backward: forward's m), and the entering state's
// weight w_inter = exp(b + m_in - m) into w_inter where defined. dd (N L) may be undefined (no addend). mlstm.py's
// _intra_weights and the products with it. (s, m and w_inter are written through their data.)
void apply_intra_weights(const at::Tensor& s, const at::Tensor& b, const at::Tensor& ig, const at::Tensor& m_in_any,
                         const at::Tensor& m, bool compute_m, const c10::optional<at::Tensor>& w_inter,
                         const c10::optional<at::Tensor>& dd, double scale) {
  const int64_t L = b.size(-1), N = b.numel() / L;
  const auto m_in = m_in_any.contiguous();  // (a view of the state stabilisers)
  TORCH_CHECK(s.is_contiguous() && b.is_contiguous() && ig.is_contiguous() && m.is_contiguous() &&
                  (!dd || dd->is_contiguous()) && (!w_inter || w_inter->is_contiguous()),
              "apply_intra_weights: contiguous tensors expected");
  dispatch_floating(s.scalar_type(), "apply_intra_weights", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* igp = ig.data_ptr<scalar_t>();
    const scalar_t* mip = m_in.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* wp = w_inter ? w_inter->data_ptr<scalar_t>() : nullptr;
    const scalar_t* ddp = dd ? dd->data_ptr<scalar_t>() : nullptr;
    const scalar_t sc = static_cast<scalar_t>(scale);
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* __restrict__ bn = bp + n * L;
        const scalar_t* __restrict__ in = igp + n * L;
        const scalar_t mi = mip[n];
        for (int64_t t = 0; t < L; ++t) {
          // log D(t, j) = (b(t) - b(j)) + ig(j) in this order, as the Python form: b(t) - b(j) of nearby tokens
          // cancels exactly, where b(t) + (ig(j) - b(j)) would round at the scale of the cumulative decay
          const scalar_t bt = bn[t];
          scalar_t mt;
          if (compute_m) {
            scalar_t mx = bt + mi;
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j <= t; ++j) mx = std::max(mx, (bt - bn[j]) + in[j]);
            mt = mx;
            mp[n * L + t] = mt;
          } else {
            mt = mp[n * L + t];
          }
          if (wp) wp[n * L + t] = std::exp(bt + mi - mt);
          scalar_t* __restrict__ row = sp + (n * L + t) * L;
          const scalar_t add = ddp ? ddp[n * L + t] : scalar_t(0);
#pragma omp simd
          for (int64_t j = 0; j <= t; ++j) row[j] = (row[j] + add) * exp_((bt - bn[j]) + in[j] - mt) * sc;
          for (int64_t j = t + 1; j < L; ++j) row[j] = 0;
        }
      }
    });
  });
}

// The entering state's weight on each query, w_inter = exp(b + m_in - m), as apply_intra_weights writes it (for a
// backward handed forward's weighted scores, which then does not apply the weights again).
void entering_weights(const at::Tensor& b, const at::Tensor& m_in_any, const at::Tensor& m, const at::Tensor& w) {
  const int64_t L = b.size(-1), N = b.numel() / L;
  const auto m_in = m_in_any.contiguous();
  TORCH_CHECK(b.is_contiguous() && m.is_contiguous() && w.is_contiguous(), "entering_weights: contiguous tensors");
  dispatch_floating(b.scalar_type(), "entering_weights", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* bp = b.data_ptr<scalar_t>();
    const scalar_t* mip = m_in.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)  // (one value per token: no threads)
      for (int64_t t = 0; t < L; ++t) wp[n * L + t] = std::exp(bp[n * L + t] + mip[n] - mp[n * L + t]);
  });
}

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

// The pairs straddling each chunk (B, NH, NC): dP * P over the pairs from before chunk c (or the initial state) to
// after it (or the final state), i.e. the state entering c (c_in, n_in) decayed through it, step_c = exp(g_c + m_in(c)
// - m_in(c + 1)) (m_in(NC) = m_final, so step_c <= 1), times the whole gradient of the state after it, T(c + 1): from
// T(NC) = the final state's gradient (or zero), T(c) = dlocal(c) + step_c T(c + 1) (dc_local, dn_local: the chunk's
// own use of its entering state). One reverse pass over the chunks per head; mlstm.py's _scan_states_backward takes
// the same sums as a G x G product per group of chunks (a loop over chunks is slow in Python).
at::Tensor straddling_pairs(const at::Tensor& g, const at::Tensor& m_in, const at::Tensor& m_final,
                            const at::Tensor& dc_local, const at::Tensor& dn_local, const at::Tensor& dc_final,
                            const at::Tensor& dn_final, const at::Tensor& c_in, const at::Tensor& n_in) {
  const int64_t NC = g.size(-1), heads = g.numel() / NC;
  const int64_t XC = c_in.numel() / (heads * NC), XN = n_in.numel() / (heads * NC);
  auto gc = g.contiguous(), mc = m_in.contiguous(), mf = m_final.contiguous();
  auto dcl = dc_local.contiguous(), dnl = dn_local.contiguous(), cc = c_in.contiguous(), nc = n_in.contiguous();
  auto dcf = dc_final.defined() ? dc_final.contiguous() : dc_final;
  auto dnf = dn_final.defined() ? dn_final.contiguous() : dn_final;
  auto out = at::empty_like(gc);
  dispatch_floating(g.scalar_type(), "straddling_pairs", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    const scalar_t* mp = mc.data_ptr<scalar_t>();
    const scalar_t* fp = mf.data_ptr<scalar_t>();
    const scalar_t* const local[2] = {dcl.data_ptr<scalar_t>(), dnl.data_ptr<scalar_t>()};
    const scalar_t* const final[2] = {dcf.defined() ? dcf.data_ptr<scalar_t>() : nullptr,
                                      dnf.defined() ? dnf.data_ptr<scalar_t>() : nullptr};
    const scalar_t* const state[2] = {cc.data_ptr<scalar_t>(), nc.data_ptr<scalar_t>()};
    const int64_t X[2] = {XC, XN};
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> total[2] = {std::vector<scalar_t>(XC), std::vector<scalar_t>(XN)};
      for (int64_t h = begin; h < end; ++h) {
        for (int i = 0; i < 2; ++i) {
          scalar_t* t = total[i].data();
          if (final[i]) {
            std::memcpy(t, final[i] + h * X[i], X[i] * sizeof(scalar_t));
          } else {
            std::fill(t, t + X[i], scalar_t(0));
          }
        }
        for (int64_t c = NC - 1; c >= 0; --c) {
          const int64_t hc = h * NC + c;
          const scalar_t step = std::exp(gp[hc] + mp[hc] - (c + 1 < NC ? mp[hc + 1] : fp[h]));
          scalar_t sum = 0;
          for (int i = 0; i < 2; ++i) {
            scalar_t* __restrict__ t = total[i].data();
            const scalar_t* __restrict__ s = state[i] + hc * X[i];
            const scalar_t* __restrict__ d = local[i] + hc * X[i];
            scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t x = 0; x < X[i]; ++x) {
              dot += t[x] * s[x];
              t[x] = d[x] + step * t[x];  // now T(c), for the chunk before
            }
            sum += dot;
          }
          op[hc] = step * sum;
        }
      }
    });
  });
  return out;
}

// Keys scaled by their per-token gate weight u, ku = k * u (B, NH, NC, L, DH), and each chunk's sum of them nk
// (B, NH, NC, DH): one pass.
std::pair<at::Tensor, at::Tensor> gated_keys(const at::Tensor& k, const at::Tensor& u) {
  const int64_t L = k.size(-2), D = k.size(-1), chunks = u.numel() / L;
  auto ku = at::empty_like(k);
  auto nk = at::empty({k.size(0), k.size(1), k.size(2), D}, k.options());
  dispatch_floating(k.scalar_type(), "gated_keys", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* kup = ku.data_ptr<scalar_t>();
    scalar_t* nkp = nk.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        scalar_t* __restrict__ sum = nkp + c * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) sum[d] = 0;
        for (int64_t t = c * L; t < (c + 1) * L; ++t) {
          const scalar_t* __restrict__ kr = kp + t * D;
          scalar_t* __restrict__ o = kup + t * D;
          const scalar_t w = up[t];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            o[d] = kr[d] * w;
            sum[d] += o[d];
          }
        }
      }
    });
  });
  return {ku, nk};
}

// Queries weighted for the entering state, qw = q * w_inter (into `out`, (B, NH, NC, L, DH)), and their product with
// the entering normaliser state n_in (B, NH, NC, DH) -> q_n (B, NH, NC, L): one pass.
at::Tensor weighted_queries(const at::Tensor& q, const at::Tensor& w_inter, const at::Tensor& n_in,
                            const at::Tensor& out) {
  const int64_t L = q.size(-2), D = q.size(-1), N = w_inter.numel();
  const auto n_c = n_in.contiguous();
  auto q_n = at::empty_like(w_inter);
  dispatch_floating(q.scalar_type(), "weighted_queries", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* wp = w_inter.data_ptr<scalar_t>();
    const scalar_t* np = n_c.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* qnp = q_n.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* __restrict__ qr = qp + t * D;
        const scalar_t* __restrict__ nr = np + (t / L) * D;
        scalar_t* __restrict__ o = op + t * D;
        const scalar_t w = wp[t];
        scalar_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) {
          o[d] = qr[d] * w;
          s += o[d] * nr[d];
        }
        qnp[t] = s;
      }
    });
  });
  return q_n;
}

// The output's normalisation, one pass over the tokens: D = the row sum of the weighted scores P (B NH NC, L, L) + q_n,
// n = max(|D|, exp(-m)) + eps, h = N / n in place on num (B, NH, NC, L, DHV) -> [D, n] (B, NH, NC, L).
std::pair<at::Tensor, at::Tensor> normalise_output(const at::Tensor& num, const at::Tensor& scores,
                                                   const at::Tensor& q_n, const at::Tensor& m, double eps) {
  const int64_t L = scores.size(-1), D = num.size(-1), N = q_n.numel();
  auto denom = at::empty_like(q_n), normaliser = at::empty_like(q_n);
  dispatch_floating(num.scalar_type(), "normalise_output", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* hp = num.data_ptr<scalar_t>();
    const scalar_t* sp = scores.data_ptr<scalar_t>();
    const scalar_t* qnp = q_n.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* dp = denom.data_ptr<scalar_t>();
    scalar_t* np = normaliser.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* __restrict__ row = sp + t * L;
        scalar_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < L; ++j) s += row[j];
        const scalar_t den = s + qnp[t];
        const scalar_t n = std::max(std::abs(den), std::exp(-mp[t])) + e;
        dp[t] = den;
        np[t] = n;
        scalar_t* __restrict__ h = hp + t * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) h[d] /= n;
      }
    });
  });
  return {denom, normaliser};
}

// The gradients at the output h = N / n (n = max(|D|, exp(-m)) + eps, m constant), one pass over the tokens: from dh
// and h (B, NH, NC, L, DHV) and per token n, D, m and the entering state's weight w_inter -> [dN = dh / n, dN * w_inter
// (DHV per token), dD = -sign(D) (dh . h) / n where |D| >= exp(-m) else 0, dD * w_inter].
std::vector<at::Tensor> output_gradients(const at::Tensor& dh, const at::Tensor& h, const at::Tensor& normaliser,
                                         const at::Tensor& denom, const at::Tensor& m, const at::Tensor& w_inter) {
  const int64_t D = h.size(-1), N = normaliser.numel();
  auto dnum = at::empty_like(h), dn_w = at::empty_like(h);
  auto d_denom = at::empty_like(normaliser), dd_w = at::empty_like(normaliser);
  dispatch_floating(h.scalar_type(), "output_gradients", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* dhp = dh.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* np = normaliser.data_ptr<scalar_t>();
    const scalar_t* dp = denom.data_ptr<scalar_t>();
    const scalar_t* mp = m.data_ptr<scalar_t>();
    const scalar_t* wp = w_inter.data_ptr<scalar_t>();
    scalar_t* dnp = dnum.data_ptr<scalar_t>();
    scalar_t* dwp = dn_w.data_ptr<scalar_t>();
    scalar_t* ddp = d_denom.data_ptr<scalar_t>();
    scalar_t* ddwp = dd_w.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* __restrict__ g = dhp + t * D;
        const scalar_t* __restrict__ hr = hp + t * D;
        scalar_t* __restrict__ a = dnp + t * D;
        scalar_t* __restrict__ b = dwp + t * D;
        const scalar_t inv = scalar_t(1) / np[t], w = wp[t];
        scalar_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          dot += g[d] * hr[d];
          const scalar_t x = g[d] * inv;
          a[d] = x;
          b[d] = x * w;
        }
        const scalar_t den = dp[t];
        const scalar_t sign = den > 0 ? scalar_t(1) : (den < 0 ? scalar_t(-1) : scalar_t(0));
        const scalar_t dd = std::abs(den) >= std::exp(-mp[t]) ? -sign * dot * inv : scalar_t(0);
        ddp[t] = dd;
        ddwp[t] = dd * w;
      }
    });
  });
  return {dnum, dn_w, d_denom, dd_w};
}

// The last terms of the inter-chunk parts of dq and dk and their dot products, one pass over the tokens (dq, dk
// written in place; q, k, dq, dk (B, NH, NC, L, DH)): dq += dd_w * n_in and dk = u * (dk + dnk) (n_in, dnk
// (B, NH, NC, DH): per chunk; dk comes as v dC^T, without the key's gate weight u, which is applied here), then ->
// [q . dq, k . dk] (B, NH, NC, L): per token the pairs' dP * P summed over the sources in earlier chunks (as target)
// and over the targets in later chunks and the final state (as source).
std::pair<at::Tensor, at::Tensor> inter_qk_terms(const at::Tensor& q, const at::Tensor& k, const at::Tensor& dq,
                                                 const at::Tensor& dk, const at::Tensor& dd_w, const at::Tensor& n_in,
                                                 const at::Tensor& u, const at::Tensor& dnk) {
  const int64_t L = u.size(-1), D = q.size(-1), N = u.numel();
  TORCH_CHECK(dq.is_contiguous() && dk.is_contiguous(), "inter_qk_terms: contiguous dq, dk expected");
  const auto n_in_c = n_in.contiguous(), dnk_c = dnk.contiguous();
  auto rows_before = at::empty_like(u), cols_after = at::empty_like(u);
  dispatch_floating(q.scalar_type(), "inter_qk_terms", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* dqp = dq.data_ptr<scalar_t>();
    scalar_t* dkp = dk.data_ptr<scalar_t>();
    const scalar_t* ddp = dd_w.data_ptr<scalar_t>();
    const scalar_t* nip = n_in_c.data_ptr<scalar_t>();
    const scalar_t* up = u.data_ptr<scalar_t>();
    const scalar_t* dnkp = dnk_c.data_ptr<scalar_t>();
    scalar_t* rbp = rows_before.data_ptr<scalar_t>();
    scalar_t* cap = cols_after.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t chunk = t / L;
        const scalar_t* __restrict__ qr = qp + t * D;
        const scalar_t* __restrict__ kr = kp + t * D;
        scalar_t* __restrict__ dqr = dqp + t * D;
        scalar_t* __restrict__ dkr = dkp + t * D;
        const scalar_t* __restrict__ nr = nip + chunk * D;
        const scalar_t* __restrict__ dnr = dnkp + chunk * D;
        const scalar_t a = ddp[t], w = up[t];
        scalar_t sq = 0, sk = 0;
#pragma omp simd reduction(+ : sq, sk)
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t gq = dqr[d] + a * nr[d], gk = w * (dkr[d] + dnr[d]);
          dqr[d] = gq;
          dkr[d] = gk;
          sq += qr[d] * gq;
          sk += kr[d] * gk;
        }
        rbp[t] = sq;
        cap[t] = sk;
      }
    });
  });
  return {rows_before, cols_after};
}

// Row-wise dot products of x and y (B, NH, NC, L, D) -> (B, NH, NC, L).
at::Tensor row_dots(const at::Tensor& x, const at::Tensor& y) {
  const int64_t D = x.size(-1), N = x.numel() / D;
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), "row_dots: contiguous tensors expected");
  auto out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  dispatch_floating(x.scalar_type(), "row_dots", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* __restrict__ xr = xp + t * D;
        const scalar_t* __restrict__ yr = yp + t * D;
        scalar_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += xr[d] * yr[d];
        op[t] = s;
      }
    });
  });
  return out;
}

// The forget gates' gradient over the pairs inside each chunk: with M(t, s) = (ds(t, s) + dd(t)) * P(t, s) (ds the
// chunk matrices dN v^T before their weights, dd (B NH NC L) the denominator's gradient, P the decayed scores as
// forward computes them, recomputed in backward; (B NH NC, L, L) both), the sum of M over the pairs s < j <= t of
// the chunk, per position j (B, NH, NC, L): along the chunk, the strictly lower column sums minus row sums of M.
// Straight from the pairs, not as a difference of sums that hold the diagonal (see chunkwise_backward).
at::Tensor intra_pair_sums(const at::Tensor& ds, const at::Tensor& p, const at::Tensor& dd) {
  const int64_t L = ds.size(-1), N = ds.numel() / (L * L);
  TORCH_CHECK(ds.is_contiguous() && p.is_contiguous() && dd.is_contiguous(), "intra_pair_sums: contiguous tensors");
  auto out = at::empty_like(dd);
  dispatch_floating(ds.scalar_type(), "intra_pair_sums", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* dsp = ds.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* ddp = dd.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> rows(L), cols(L);
      for (int64_t n = begin; n < end; ++n) {
        std::fill(cols.begin(), cols.end(), scalar_t(0));
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t* __restrict__ a = dsp + (n * L + t) * L;
          const scalar_t* __restrict__ b = pp + (n * L + t) * L;
          scalar_t* __restrict__ c = cols.data();
          const scalar_t add = ddp[n * L + t];
          scalar_t r = 0;
#pragma omp simd reduction(+ : r)
          for (int64_t s = 0; s < t; ++s) {
            const scalar_t m = (a[s] + add) * b[s];
            r += m;
            c[s] += m;
          }
          rows[t] = r;
        }
        scalar_t acc = 0;
        for (int64_t j = 0; j < L; ++j) {
          op[n * L + j] = acc;
          acc += cols[j] - rows[j];
        }
      }
    });
  });
  return out;
}

// The forget gates' gradient: d a_j = the pairs' dP * P summed over the pairs (t, s) with s < j <= t; for j in chunk
// c: `inside` (the pairs inside c, intra_pair_sums), the suffix sum along c of rows_before (from an earlier chunk to
// t >= j in c), the exclusive prefix sum along c of cols_after (from s < j in c to a later chunk; both from
// inter_qk_terms) and `straddling` (B, NH, NC: from before c to after it, straddling_pairs), each summed
// directly; times d logsigmoid(f) = sigmoid(-f).
at::Tensor forget_gate_gradient(const at::Tensor& rows_before, const at::Tensor& cols_after, const at::Tensor& inside,
                                const at::Tensor& fg, const at::Tensor& straddling) {
  const int64_t L = fg.size(3), chunks = fg.numel() / L;
  auto dfg = at::empty_like(fg);
  auto sc = straddling.contiguous();
  dispatch_floating(fg.scalar_type(), "forget_gate_gradient", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* rp = rows_before.data_ptr<scalar_t>();
    const scalar_t* cp = cols_after.data_ptr<scalar_t>();
    const scalar_t* ip = inside.data_ptr<scalar_t>();
    const scalar_t* fp = fg.data_ptr<scalar_t>();
    const scalar_t* xp = sc.data_ptr<scalar_t>();
    scalar_t* op = dfg.data_ptr<scalar_t>();
    for (int64_t r = 0; r < chunks; ++r) {  // (a few thousand values: no threads)
      const int64_t o = r * L;
      // sums accumulated in double, as torch.cumsum on CPU (the Python form: flip, cumsum, flip; cumsum)
      double suffix = 0;  // rows_before over t >= j
      for (int64_t t = L - 1; t >= 0; --t) {
        suffix += static_cast<double>(rp[o + t]);
        op[o + t] = static_cast<scalar_t>(suffix);
      }
      double prefix = 0;  // cols_after over s < j
      for (int64_t t = 0; t < L; ++t) {
        op[o + t] = (ip[o + t] + op[o + t] + static_cast<scalar_t>(prefix) + xp[r]) * sigmoid(-fp[o + t]);
        prefix += static_cast<double>(cp[o + t]);
      }
    }
  });
  return dfg;
}

}  // namespace

// Forward of the chunkwise kernel. With `intra` false (a replayed record) only the chunk states: [c_in, n_in, m_in,
// c_final, n_final, m_final]; else also [h (B, NH, NC, L, DHV), denom, normaliser, m (B, NH, NC, L), the weighted
// scores P (B, NH, NC, L, L)] after them (P: for a backward that is handed it instead of computing it again).
std::vector<at::Tensor> chunkwise_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& ig, const at::Tensor& fg,
                                          const c10::optional<at::Tensor>& c0, const c10::optional<at::Tensor>& n0,
                                          const at::Tensor& m0, double eps, bool intra) {
  RECORD_FUNCTION("vilseg::chunkwise_forward", std::vector<c10::IValue>());  // (a profiler sees it as an operator)
  const FlushDenormals flush;
  const int64_t B = q.size(0), NH = q.size(1), NC = q.size(2), L = q.size(3), DH = q.size(4), DHV = v.size(4);
  for (const auto* t : {&q, &k, &v, &ig, &fg})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "chunkwise_forward: contiguous CPU tensors of one dtype expected");
  const double scale = 1.0 / std::sqrt(static_cast<double>(DH));
  auto gates = chunk_gates(ig, fg, scale);
  auto q3 = q.view({-1, L, DH}), k3 = k.view({-1, L, DH}), v3 = v.view({-1, L, DHV});
  auto [ku, nk] = gated_keys(k, gates.u);
  auto kv = at::bmm(ku.view({-1, L, DH}).transpose(1, 2), v3);  // (B NH NC, DH, DHV)
  auto states = scan_states(gates.g, gates.m_loc, m0, kv.view({B, NH, NC, DH, DHV}), nk, c0, n0);
  if (!intra) return states;
  const auto& c_in = states[0];
  const auto& n_in = states[1];
  const auto& m_in = states[2];
  auto scores = at::bmm(q3, k3.transpose(1, 2));  // (B NH NC, L, L) -> P(t, s) in place
  auto m = at::empty_like(ig), w_inter = at::empty_like(ig);
  apply_intra_weights(scores, gates.b, ig, m_in, m, true, w_inter, c10::nullopt, scale);
  auto q_n = weighted_queries(q, w_inter, n_in, ku);  // q * w_inter into ku's buffer (dead by now)
  auto num = at::bmm(scores, v3).baddbmm_(ku.view({-1, L, DH}), c_in.view({-1, DH, DHV}));
  auto h = num.view({B, NH, NC, L, DHV});
  auto [denom, normaliser] = normalise_output(h, scores, q_n, m, eps);
  states.insert(states.end(), {h, denom, normaliser, m, scores.view({B, NH, NC, L, L})});
  return states;
}

// Backward of chunkwise_forward (mlstm.py's _ChunkwiseMLSTM.backward): dh (B, NH, NC, L, DHV), d c_final, d n_final
// (each may be undefined), the inputs and forward's states and record -> [dq, dk, dv, d ig, d fg, d c0, d n0] (the
// last two undefined without an initial state).
std::vector<at::Tensor> chunkwise_backward(const c10::optional<at::Tensor>& dh_opt,
                                           const c10::optional<at::Tensor>& dc_final_opt,
                                           const c10::optional<at::Tensor>& dn_final_opt, const at::Tensor& q,
                                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& ig,
                                           const at::Tensor& fg,
                                           const at::Tensor& c_in, const at::Tensor& n_in, const at::Tensor& m_in,
                                           const at::Tensor& m_final, const at::Tensor& h, const at::Tensor& denom,
                                           const at::Tensor& normaliser, const at::Tensor& m, bool initial,
                                           const c10::optional<at::Tensor>& scores) {
  RECORD_FUNCTION("vilseg::chunkwise_backward", std::vector<c10::IValue>());
  const FlushDenormals flush;
  const int64_t B = q.size(0), NH = q.size(1), NC = q.size(2), L = q.size(3), DH = q.size(4), DHV = v.size(4);
  const double scale = 1.0 / std::sqrt(static_cast<double>(DH));
  const at::Tensor dh_in = dh_opt.value_or(at::Tensor()), dc_final_in = dc_final_opt.value_or(at::Tensor()),
                   dn_final_in = dn_final_opt.value_or(at::Tensor());
  auto gates = chunk_gates(ig, fg, scale);
  auto q3 = q.view({-1, L, DH}), k3 = k.view({-1, L, DH}), v3 = v.view({-1, L, DHV});
  // intra-chunk: P = scale * (q k^T) * W; N = P v, D = P 1 (P handed over from forward, or computed again)
  auto w_inter = at::empty_like(ig);  // (m: forward's stabiliser, read)
  at::Tensor p;
  if (scores) {
    TORCH_CHECK(scores->is_contiguous() && scores->numel() == q3.size(0) * L * L &&
                    scores->scalar_type() == q.scalar_type(),
                "chunkwise_backward: scores must be forward's contiguous (B, NH, NC, L, L)");
    p = scores->view({-1, L, L});
    entering_weights(gates.b, m_in, m, w_inter);
  } else {
    p = at::bmm(q3, k3.transpose(1, 2));
    apply_intra_weights(p, gates.b, ig, m_in, m, false, w_inter, c10::nullopt, scale);
  }
  // h = N / n with n = max(|D|, exp(-m)) + eps, m constant; the gradients reaching the entering state carry its
  // weight w_inter
  at::Tensor dnum, dn_w, d_denom, dd_w;
  if (!dh_in.defined()) {
    dnum = at::zeros({B, NH, NC, L, DHV}, q.options());
    dn_w = at::zeros_like(dnum);
    d_denom = at::zeros_like(denom);
    dd_w = at::zeros_like(denom);
  } else {
    auto og = output_gradients(dh_in.contiguous(), h, normaliser, denom, m, w_inter);
    dnum = og[0], dn_w = og[1], d_denom = og[2], dd_w = og[3];
  }
  auto dnm = dnum.view({-1, L, DHV});
  auto dv = at::bmm(p.transpose(1, 2), dnm);
  auto ds = at::bmm(dnm, v3.transpose(1, 2));  // -> (ds + d_denom) * W * scale in place, after the pair sums
  // the forget gates' gradient over the pairs inside each chunk, from the pairs' dP * P directly: as a reverse
  // cumulative sum of q . dq - k . dk every pair after a position enters twice and cancels, and where gates forget
  // fast the sums are mostly such terms (the diagonal above all), so little of the result survived their rounding
  auto inside = intra_pair_sums(ds, p, d_denom);
  p.reset();
  apply_intra_weights(ds, gates.b, ig, m_in, m, false, c10::nullopt, d_denom, scale);
  // inter-chunk: output from the entering state, then the state gradients through the transposed state weights
  auto dq = at::bmm(dn_w.view({-1, L, DHV}), c_in.view({-1, DH, DHV}).transpose(1, 2));
  auto dc_local = at::bmm(q3.transpose(1, 2), dn_w.view({-1, L, DHV}));  // (B NH NC, DH, DHV)
  auto dn_local = at::matmul(dd_w.unsqueeze(-2), q).squeeze(-2);    // (B, NH, NC, DH)
  auto sb = scan_states_backward(gates.g, gates.m_loc, m_in, dc_local.view(c_in.sizes()), dn_local, dc_final_in,
                                 dn_final_in, initial);
  auto straddling = straddling_pairs(gates.g, m_in, m_final, dc_local, dn_local, dc_final_in, dn_final_in, c_in, n_in);
  auto dkv3 = sb[0].view({-1, DH, DHV});
  auto ku = gated_keys(k, gates.u).first;
  auto dk = at::bmm(v3, dkv3.transpose(1, 2));  // (u: inter_qk_terms applies it)
  // the inter-chunk parts' dot products with q and k (before the intra-chunk parts join them): the pairs across chunks
  auto [rows_before, cols_after] = inter_qk_terms(q, k, dq.view(q.sizes()), dk.view(k.sizes()), dd_w, n_in, gates.u,
                                                  sb[1]);
  dq.baddbmm_(ds, k3);
  dk.baddbmm_(ds.transpose(1, 2), q3);
  ds.reset();
  dq = dq.view(q.sizes());
  dk = dk.view(k.sizes());
  dv.baddbmm_(ku.view({-1, L, DH}), dkv3);
  dv = dv.view(v.sizes());
  // gates: di_s = k_s . dk_s (the pairs with source s); d a_j = the pairs (t, s) with s < j <= t
  auto di = row_dots(k, dk);
  auto dfg = forget_gate_gradient(rows_before, cols_after, inside, fg, straddling);
  return {dq, dk, dv, di, dfg, sb[2], sb[3]};
}
