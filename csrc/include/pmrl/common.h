// Host/device shim, constants and compile-time dispatch shared by the CPU and CUDA kernels.
// No torch header may be included here: the CUDA sources must compile with a bare nvcc.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#define PMRL_HD __host__ __device__ __forceinline__
// Full unrolling keeps per-instance arrays in registers (indices become compile-time constants).
#define PMRL_UNROLL _Pragma("unroll")
#else
#define PMRL_HD inline
#define PMRL_UNROLL
#endif

namespace pmrl {

// The numeric contract of pmrl_kernels/constants.py (docs/maths.md, "Singular cases"), exported by the extension
// as _C.constants() and compared with the Python copy by tests/test_constants.py.
constexpr double kSigmaEps = 1e-3;
constexpr double kGapEps = 1e-4;
constexpr double kNormEps = 1e-12;  // as torch.nn.functional.normalize
constexpr double kSignTol = 1e-4;

constexpr int kMinM = 2;
constexpr int kMaxM = 16;

// Cyclic Jacobi rotates (p, q) while a_pq^2 > (kJacobiRelTol eps)^2 |a_pp a_qq| and converges quadratically
// (M = 16 needs about 10 sweeps in double precision); the cap only bounds the work on pathological input, so the
// solver terminates on anything.
constexpr double kJacobiRelTol = 1.0;
constexpr int kMaxSweeps = 40;

template <class T>
struct Num;

template <>
struct Num<float> {
  static PMRL_HD float tiny() { return FLT_MIN; }  // torch.finfo(torch.float32).tiny
  static PMRL_HD float max() { return FLT_MAX; }
  static PMRL_HD float eps() { return FLT_EPSILON; }
  static PMRL_HD float sqrt(float x) { return ::sqrtf(x); }
  static PMRL_HD float abs(float x) { return ::fabsf(x); }
  static PMRL_HD int exponent(float x) {
    int e;
    ::frexpf(x, &e);
    return e;
  }
  static PMRL_HD float pow2(int e) { return ::ldexpf(1.0f, e); }
  static constexpr int kMaxScaleExp = 126;  // 2^126 is the largest power of two whose inverse is normal
};

template <>
struct Num<double> {
  static PMRL_HD double tiny() { return DBL_MIN; }
  static PMRL_HD double max() { return DBL_MAX; }
  static PMRL_HD double eps() { return DBL_EPSILON; }
  static PMRL_HD double sqrt(double x) { return ::sqrt(x); }
  static PMRL_HD double abs(double x) { return ::fabs(x); }
  static PMRL_HD int exponent(double x) {
    int e;
    ::frexp(x, &e);
    return e;
  }
  static PMRL_HD double pow2(int e) { return ::ldexp(1.0, e); }
  static constexpr int kMaxScaleExp = 1022;
};

template <class T>
PMRL_HD T quiet_nan() {
  return static_cast<T>(NAN);
}

// NaN and +-Inf both fail: x - x is NaN for them.
template <class T>
PMRL_HD bool is_finite(T x) {
  return x - x == T(0);
}

// The power of two r with r x in [0.5, 1) (within the type's normal range): multiplying by it is exact, so rows
// scaled by it before they are squared neither overflow nor underflow (docs/maths.md, "Scale"). 1 for 0, NaN, Inf.
template <class T>
PMRL_HD T scale_for(T x) {
  if (!(x > T(0) && x <= Num<T>::max())) return T(1);
  int e = -Num<T>::exponent(x);
  e = e > Num<T>::kMaxScaleExp ? Num<T>::kMaxScaleExp : (e < -Num<T>::kMaxScaleExp ? -Num<T>::kMaxScaleExp : e);
  return Num<T>::pow2(e);
}

// x capped at the largest finite value, NaN kept: a row scale c / max(||zhat_m||, r_m NORM_EPS) passes it only for an
// exactly zero row, whose products with it are then exactly 0 instead of 0 * inf = NaN (docs/maths.md, "Scale").
template <class T>
PMRL_HD T cap_finite(T x) {
  return x > Num<T>::max() ? Num<T>::max() : x;
}

// x / (x^2 + floor^2): 1/x for |x| >> floor, smoothly 0 at x = 0 (pmrl_kernels.terms.safe_inverse).
template <class T>
PMRL_HD T safe_inverse(T x, T floor_sq) {
  return x / (x * x + floor_sq);
}

// Calls f(std::integral_constant<int, m>{}) for a runtime m in [Lo, Hi] (the caller has checked the range), so
// every per-instance array is sized at compile time.
template <int Lo, int Hi, class F>
decltype(auto) dispatch_m(int m, F&& f) {
  if constexpr (Lo == Hi) {
    return f(std::integral_constant<int, Lo>{});
  } else {
    if (m == Lo) return f(std::integral_constant<int, Lo>{});
    return dispatch_m<Lo + 1, Hi>(m, std::forward<F>(f));
  }
}

template <class F>
decltype(auto) dispatch_modalities(int m, F&& f) {
  return dispatch_m<kMinM, kMaxM>(m, std::forward<F>(f));
}

}  // namespace pmrl
