// CUDA kernel of gram_eig (see kernels.cuh for the layout), and its launcher for a range of M;
// the gram_eig_forward_m*.cu files instantiate the ranges, gram_eig_forward.cu dispatches to them.
#pragma once

#include "kernels.cuh"

namespace pmrl::cuda {
namespace forward_detail {

// This lane's partial sums of zhat_m . zhat_k (zhat = r z) over its features, the lower triangle packed: pair
// (m, k <= m) at m (m + 1) / 2 + k. Only constant indices touch acc, so it stays in registers.
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void gram_partial(const Lanes<In, M>& lanes, bool vec, const T (&r)[M],
                                             T (&acc)[M * (M + 1) / 2]) {
  PMRL_UNROLL
  for (int p = 0; p < M * (M + 1) / 2; ++p) acc[p] = T(0);
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
}

// The Gram matrix g of the scaled rows, summed over the group's lanes, whole in every lane (M < kWarpMathsMinM).
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void gram(const Lanes<In, M>& lanes, bool vec, const T (&r)[M], T (&g)[M][M]) {
  T acc[M * (M + 1) / 2];
  gram_partial<In, T, M, Scaled>(lanes, vec, r, acc);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int k = 0; k <= m; ++k) g[k][m] = g[m][k] = group_sum(acc[m * (m + 1) / 2 + k], lanes.group);
  }
}

// The Gram matrix summed over the warp, spread a row a lane: lane l < M gets row l, every lane the diagonal.
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void gram_row(const Lanes<In, M>& lanes, bool vec, const T (&r)[M], int lane,
                                         T (&row)[M], T (&diag)[M]) {
  T acc[M * (M + 1) / 2];
  gram_partial<In, T, M, Scaled>(lanes, vec, r, acc);
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) row[k] = T(0);  // lanes >= M keep a zero row
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int k = 0; k <= m; ++k) {
      const T sum = group_sum(acc[m * (m + 1) / 2 + k], 32);
      if (lane == m) row[k] = sum;
      if (lane == k) row[m] = sum;
      if (k == m) diag[m] = sum;
    }
  }
}

// Writes S (lane 0) and lead; the kernels write U, which they hold differently.
template <class In, class T, int M>
__device__ __forceinline__ void write_s_and_lead(const Lanes<In, M>& lanes, const ForwardArgs& args, bool vec,
                                                 const T (&r)[M], const T (&s)[M], const T (&lead_coef)[M]) {
  const int64_t i = lanes.instance;
  if (lanes.lane == 0) {
    T* s_out = static_cast<T*>(args.s) + i * M;
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) s_out[m] = s[m];
  }
  const T no_gbar[1] = {T(0)};
  const T unscaled[1] = {T(1)};
  const T* no_extra = nullptr;
  T* lead = static_cast<T*>(args.lead) + i * args.dim;
  with_vec(vec, [&](auto vc) {
    lanes.template write_rows<decltype(vc)::value>([&](int, int m) { return lead_coef[m]; }, r, no_gbar, unscaled,
                                                   unscaled, no_extra, lead, 0);
  });
}

// M < kWarpMathsMinM: the whole maths in every lane of the group.
template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  T r[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = T(1);
  T g[M][M];
  gram<In, T, M, false>(lanes, vec, r, g);
  T diag[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) diag[m] = g[m][m];
  if (rescaled<In, T, M>(lanes, vec, args.normalize, diag, r)) gram<In, T, M, true>(lanes, vec, r, g);
  Spectrum<T, M> sp;
  gram_spectrum<T, M>(g, r, args.normalize, args.dim, sp);
  if (!lanes.valid) return;
  if (lanes.lane == 0) {
    T* u = static_cast<T*>(args.u) + lanes.instance * M * M;
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) {
      PMRL_UNROLL
      for (int k = 0; k < M; ++k) u[m * M + k] = sp.u[m][k];
    }
  }
  write_s_and_lead<In, T, M>(lanes, args, vec, r, sp.s, sp.lead_coef);
}

// M >= kWarpMathsMinM: one warp an instance, the matrices a row a lane (pmrl/warp_instance.h). A minimum of one
// block per multiprocessor in the bounds: without it ptxas capped bf16/fp16 at M = 11 to 128 registers and spilled.
template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads, 1) warp_forward_kernel(const ForwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  const HardwareWarp warp;
  T r[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = T(1);
  // the Gram passes read one feature a lane and step: M (M + 1) / 2 accumulators leave no registers for vectors
  T row[M], diag[M];
  gram_row<In, T, M, false>(lanes, false, r, warp.lane(), row, diag);
  if (rescaled<In, T, M>(lanes, false, args.normalize, diag, r)) {
    gram_row<In, T, M, true>(lanes, false, r, warp.lane(), row, diag);
  }
  T s[M], u_row[M], lead_coef[M];
  warp_gram_spectrum<HardwareWarp, T, M>(warp, row, r, args.normalize, args.dim, s, u_row, lead_coef);
  if (!lanes.valid) return;  // the whole warp: one instance
  if (lanes.lane < M) {
    T* u = static_cast<T*>(args.u) + (lanes.instance * M + lanes.lane) * M;
    PMRL_UNROLL
    for (int k = 0; k < M; ++k) u[k] = u_row[k];
  }
  write_s_and_lead<In, T, M>(lanes, args, vec, r, s, lead_coef);
}

}  // namespace forward_detail

template <int Lo, int Hi>
cudaError_t gram_eig_forward_in(const ForwardArgs& args, cudaStream_t stream) {
  using namespace forward_detail;
  return launch_over_instances<Lo, Hi>(args, {args.lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    constexpr int M = decltype(mc)::value;
    if constexpr (M >= kWarpMathsMinM) {
      return warp_forward_kernel<typename Ty::input, typename Ty::compute, M>;
    } else {
      return forward_kernel<typename Ty::input, typename Ty::compute, M>;
    }
  });
}

}  // namespace pmrl::cuda
