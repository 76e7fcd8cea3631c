// Helpers shared by vilseg's native CPU operators (vil_layer.cpp, mlstm_chunkwise.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace vilseg_native {

// exp in a form the compiler vectorises (libm's expf is scalar): Cephes' range reduction and polynomial, within 2
// ulp of expf on the clamped range; double precision keeps std::exp (tests)
#pragma omp declare simd
inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // (std::fmin / fmax are library calls here)
  // round to nearest by adding and subtracting 1.5 * 2^23 (std::nearbyint would be a library call as well)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return e * scale;
}
#pragma omp declare simd
inline double exp_(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Denormal floats (below ~1e-38 in float32) cost x86 a microcode assist of a hundred cycles or more per instruction
// that meets one; the kernel's decay weights reach them wherever gates decay strongly (exp of log-decays far below
// the stabiliser), which made layers with faster-forgetting gates than the initialised ones several times slower
// (README). While a FlushDenormals lives, the threads of PyTorch's intra-op pool (its at::parallel_for loops, and the
// BLAS products, which run on the same OpenMP threads) flush them to zero (MXCSR's FTZ and DAZ bits); each thread
// gets its own setting back after. At values that small the kernel's results change by nothing a float32 can hold.
namespace detail {
#if defined(__SSE__)
constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) and DAZ (bit 6)
inline thread_local unsigned saved_csr = 0;
inline thread_local bool flushing = false;
#endif

inline void set_thread_flush(bool flush) {
#if defined(__SSE__)
  if (flush && !flushing) {
    saved_csr = _mm_getcsr();
    _mm_setcsr(saved_csr | kFlushBits);
    flushing = true;
  } else if (!flush && flushing) {
    _mm_setcsr(saved_csr);
    flushing = false;
  }
#endif
}

inline bool thread_flushing() {
#if defined(__SSE__)
  return flushing;
#else
  return true;  // (nothing to set)
#endif
}

// each thread of the pool once (OpenMP gives thread i the range [i, i + 1) of a range as long as the pool; within a
// parallel region the caller's thread alone)
inline void set_pool_flush(bool flush) {
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { set_thread_flush(flush); });
  set_thread_flush(flush);
}
}  // namespace detail

class FlushDenormals {
 public:
  FlushDenormals() : owner_(!detail::thread_flushing()) {
    if (owner_) detail::set_pool_flush(true);
  }
  ~FlushDenormals() {
    if (owner_) detail::set_pool_flush(false);
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  bool owner_;  // (a guard inside another's lifetime leaves the setting to the outer one)
};

// Per-thread accumulators for parameter gradients (reductions over tokens), summed at the end.
template <typename T>
struct ThreadSums {
  int64_t size;
  std::vector<T> data;
  explicit ThreadSums(int64_t n) : size(n), data(static_cast<size_t>(n) * at::get_num_threads(), T(0)) {}
  T* local() { return data.data() + static_cast<size_t>(at::get_thread_num()) * size; }
  void reduce_into(T* out) const {
    const int64_t threads = static_cast<int64_t>(data.size()) / size;
    for (int64_t i = 0; i < size; ++i) {
      T s = T(0);
      for (int64_t t = 0; t < threads; ++t) s += data[t * size + i];
      out[i] = s;
    }
  }
};

// AT_DISPATCH_FLOATING_TYPES without the macro: OpenMP pragmas cannot stand inside a macro's arguments
template <typename F>
void dispatch_floating(at::ScalarType type, const char* name, F&& body) {
  if (type == at::kFloat) {
    body(float{});
  } else if (type == at::kDouble) {
    body(double{});
  } else {
    TORCH_CHECK(false, name, ": float32 or float64 expected, got ", type);
  }
}

}  // namespace vilseg_native
