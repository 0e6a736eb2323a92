// CUDA kernel of gram_eig_backward (see kernels.cuh for the layout), and its launcher for a range of M;
// the gram_eig_backward_m*.cu files instantiate the ranges, gram_eig_backward.cu dispatches to them.
#pragma once

#include "kernels.cuh"

namespace pmrl::cuda {
namespace backward_detail {

// sq[m] = zhat_m . zhat_m (with normalize) and zg[m] = zhat_m . gbar (with gbar), zhat = r z, summed over the
// group's lanes.
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void reductions(const Lanes<In, M>& lanes, bool vec, bool normalize, const T* gbar,
                                           const T (&r)[M], T (&sq)[M], T (&zg)[M]) {
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) sq[m] = zg[m] = T(0);
  with_vec(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    lanes.template for_features<V, T>([&](int64_t d, const T (&x)[M][V]) {
      T g[V];
      if (gbar != nullptr) load<V>(gbar + d, g);
      PMRL_UNROLL
      for (int v = 0; v < V; ++v) {
        PMRL_UNROLL
        for (int m = 0; m < M; ++m) {
          const T xs = Scaled ? r[m] * x[m][v] : x[m][v];
          if (normalize) sq[m] += xs * xs;
          if (gbar != nullptr) zg[m] += xs * g[v];
        }
      }
    });
  });
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    sq[m] = group_sum(sq[m], lanes.group);
    zg[m] = group_sum(zg[m], lanes.group);
  }
}

// The reductions of the rows scaled by r (docs/maths.md, "Scale"): r = 1 unless a row's squared norm over- or
// underflowed (with normalize; without, the backward takes the raw rows).
template <class In, class T, int M>
__device__ __forceinline__ void scaled_reductions(const Lanes<In, M>& lanes, bool vec, bool normalize, const T* gbar,
                                                  T (&r)[M], T (&sq)[M], T (&zg)[M]) {
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    sq[m] = zg[m] = T(0);
    r[m] = T(1);
  }
  if (!normalize && gbar == nullptr) return;
  reductions<In, T, M, false>(lanes, vec, normalize, gbar, r, sq, zg);
  if (normalize && rescaled<In, T, M>(lanes, vec, true, sq, r)) {
    reductions<In, T, M, true>(lanes, vec, normalize, gbar, r, sq, zg);
  }
}

// M < kWarpMathsMinM: the whole maths in every lane of the group. A minimum of one block per multiprocessor in the
// bounds: without it ptxas capped bf16/fp16 at M = 6 to 128 registers and spilled.
template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  const int64_t i = lanes.valid ? lanes.instance : 0;
  const T* gbar = args.grad_lead ? static_cast<const T*>(args.grad_lead) + i * args.dim : nullptr;
  T sq[M], zg[M], r[M];
  scaled_reductions<In, T, M>(lanes, vec, args.normalize, gbar, r, sq, zg);
  if (!lanes.valid) return;
  T s[M], u[M][M];
  const T* s_in = static_cast<const T*>(args.s) + i * M;
  const T* u_in = static_cast<const T*>(args.u) + i * M * M;
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    s[m] = s_in[m];
    PMRL_UNROLL
    for (int k = 0; k < M; ++k) u[m][k] = u_in[m * M + k];
  }
  const T* grad_s = args.grad_s ? static_cast<const T*>(args.grad_s) + i * M : nullptr;
  T a[M][M], e[M], out_scale[M];
  backward_coefficients<T, M>(s, u, grad_s, gbar != nullptr, sq, zg, args.normalize, r, a, e, out_scale);
  In* dz = static_cast<In*>(args.dz) + i * args.dz_stride_b;
  with_vec(vec, [&](auto vc) {
    lanes.template write_rows<decltype(vc)::value>([&](int m, int n) { return a[m][n]; }, r, e, out_scale, r, gbar,
                                                   dz, args.dz_stride_m);
  });
}

// M >= kWarpMathsMinM: one warp an instance, U and the coefficients a row a lane (pmrl/warp_instance.h); the
// coefficient rows go through shared memory to every lane for the pass over D.
template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads, 1) warp_backward_kernel(const BackwardArgs args, int group, bool vec) {
  __shared__ T stage[kThreads / 32][M][M];
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  const HardwareWarp warp;
  const int lane = warp.lane();
  const int64_t i = lanes.valid ? lanes.instance : 0;
  const T* gbar = args.grad_lead ? static_cast<const T*>(args.grad_lead) + i * args.dim : nullptr;
  T sq[M], zg[M], r[M];
  scaled_reductions<In, T, M>(lanes, vec, args.normalize, gbar, r, sq, zg);
  if (!lanes.valid) return;  // the whole warp: one instance
  T s[M], u_row[M];
  const T* s_in = static_cast<const T*>(args.s) + i * M;
  const T* u_in = static_cast<const T*>(args.u) + (i * M + (lane < M ? lane : 0)) * M;
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    s[m] = s_in[m];
    u_row[m] = lane < M ? u_in[m] : T(0);
  }
  const T* grad_s = args.grad_s ? static_cast<const T*>(args.grad_s) + i * M : nullptr;
  T a_row[M], e[M], out_scale[M];
  warp_backward_coefficients<HardwareWarp, T, M>(warp, s, u_row, grad_s, gbar != nullptr, sq, zg, args.normalize, r,
                                                 a_row, e, out_scale);
  T (&coef)[M][M] = stage[threadIdx.x / 32];
  if (lane < M) {
    PMRL_UNROLL
    for (int n = 0; n < M; ++n) coef[lane][n] = a_row[n];
  }
  __syncwarp();
  In* dz = static_cast<In*>(args.dz) + i * args.dz_stride_b;
  with_vec(vec, [&](auto vc) {
    lanes.template write_rows<decltype(vc)::value>([&](int m, int n) { return coef[m][n]; }, r, e, out_scale, r,
                                                   gbar, dz, args.dz_stride_m);
  });
}

}  // namespace backward_detail

template <int Lo, int Hi>
cudaError_t gram_eig_backward_in(const BackwardArgs& args, cudaStream_t stream) {
  using namespace backward_detail;
  return launch_over_instances<Lo, Hi>(args, {args.grad_lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    constexpr int M = decltype(mc)::value;
    if constexpr (M >= kWarpMathsMinM) {
      return warp_backward_kernel<typename Ty::input, typename Ty::compute, M>;
    } else {
      return backward_kernel<typename Ty::input, typename Ty::compute, M>;
    }
  });
}

}  // namespace pmrl::cuda
