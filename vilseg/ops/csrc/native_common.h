// Helpers shared by vilseg's native CPU operators (vil_layer.cpp, mlstm_chunkwise.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

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
