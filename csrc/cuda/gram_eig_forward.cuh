// CUDA kernel of gram_eig (see kernels.cuh for the layout), and its launcher for a range of M;
// the gram_eig_forward_m*.cu files instantiate the ranges, gram_eig_forward.cu dispatches to them.
#pragma once

#include "kernels.cuh"

namespace pmrl::cuda {
namespace forward_detail {

// Above kUnrollMaxM, not inlined: the eigen-solver is compiled once per (T, M) and shared by the input dtypes
// that compute in float (float, half, bfloat16), which cuts the build time of this file by about a third; its
// M x M arrays live in local memory there anyway. Up to kUnrollMaxM inlined, so they stay in registers (a call
// would pass them through a stack frame).
template <class T, int M>
__device__ __noinline__ void spectrum_call(T (&g)[M][M], const T (&r)[M], bool normalize, int64_t dim,
                                           Spectrum<T, M>& sp) {
  gram_spectrum<T, M>(g, r, normalize, dim, sp);
}

template <class T, int M>
__device__ __forceinline__ void spectrum(T (&g)[M][M], const T (&r)[M], bool normalize, int64_t dim,
                                         Spectrum<T, M>& sp) {
  if constexpr (M <= kUnrollMaxM) {
    gram_spectrum<T, M>(g, r, normalize, dim, sp);
  } else {
    spectrum_call<T, M>(g, r, normalize, dim, sp);
  }
}

// The lower triangle of zhat_m . zhat_k (zhat = r z), summed over the group's lanes into g.
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void gram(const Lanes<In, M>& lanes, bool vec, const T (&r)[M], T (&g)[M][M]) {
  // only constant indices touch acc (the M x M matrix handed to the maths below may be indexed at run time for
  // large M, which would put it in local memory)
  constexpr int kPairs = M * (M + 1) / 2;
  T acc[kPairs];
  PMRL_UNROLL
  for (int p = 0; p < kPairs; ++p) acc[p] = T(0);
  with_vec(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    lanes.template for_features<V, T>([&](int64_t, const T (&x)[M][V]) {
      PMRL_UNROLL
      for (int m = 0; m < M; ++m) {
        PMRL_UNROLL
        for (int k = 0; k <= m; ++k) {
          PMRL_UNROLL
          for (int v = 0; v < V; ++v) {
            if constexpr (Scaled) {
              acc[m * (m + 1) / 2 + k] += (r[m] * x[m][v]) * (r[k] * x[k][v]);
            } else {
              acc[m * (m + 1) / 2 + k] += x[m][v] * x[k][v];
            }
          }
        }
      }
    });
  });
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int k = 0; k <= m; ++k) g[k][m] = g[m][k] = group_sum(acc[m * (m + 1) / 2 + k], lanes.group);
  }
}

template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  T r[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = T(1);
  T g[M][M];
  gram<In, T, M, false>(lanes, vec, r, g);
  // The shuffles need every lane of the warp: the whole warp takes the slow path when one instance needs it, and
  // the others keep r = 1, which reproduces their fast-path sums exactly.
  T diag[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) diag[m] = g[m][m];
  const bool needs = lanes.valid && gram_needs_rescale<T, M>(diag, args.normalize);
  if (__any_sync(0xffffffffu, needs)) {
    T scaled[M];
    with_vec(vec, [&](auto vc) { lanes.template rescale<decltype(vc)::value>(args.normalize, scaled); });
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) r[m] = needs ? scaled[m] : T(1);
    gram<In, T, M, true>(lanes, vec, r, g);
  }
  Spectrum<T, M> sp;
  spectrum<T, M>(g, r, args.normalize, args.dim, sp);
  if (!lanes.valid) return;
  const int64_t i = lanes.instance;
  if (lanes.lane == 0) {
    T* s = static_cast<T*>(args.s) + i * M;
    T* u = static_cast<T*>(args.u) + i * M * M;
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) {
      s[m] = sp.s[m];
      PMRL_UNROLL
      for (int k = 0; k < M; ++k) u[m * M + k] = sp.u[m][k];
    }
  }
  T coef[1][M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) coef[0][m] = sp.lead_coef[m];
  const T no_gbar[1] = {T(0)};
  const T unscaled[1] = {T(1)};
  const T* no_extra = nullptr;
  T* lead = static_cast<T*>(args.lead) + i * args.dim;
  with_vec(vec, [&](auto vc) {
    lanes.template write_rows<decltype(vc)::value>(coef, r, no_gbar, unscaled, unscaled, no_extra, lead, 0);
  });
}

}  // namespace forward_detail

template <int Lo, int Hi>
cudaError_t gram_eig_forward_in(const ForwardArgs& args, cudaStream_t stream) {
  using namespace forward_detail;
  return launch_over_instances<Lo, Hi>(args, {args.lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    return forward_kernel<typename Ty::input, typename Ty::compute, decltype(mc)::value>;
  });
}

}  // namespace pmrl::cuda
