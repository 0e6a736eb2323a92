// CUDA kernel of gram_eig_backward (see kernels.cuh for the layout), and its launcher for a range of M;
// the gram_eig_backward_m*.cu files instantiate the ranges, gram_eig_backward.cu dispatches to them.
#pragma once

#include "kernels.cuh"

namespace pmrl::cuda {
namespace backward_detail {

// sq[m] = zhat_m . zhat_m (with normalize), zg[m] = zhat_m . gbar and lg = lead . gbar (with gbar), zhat = r z,
// summed over the group's lanes.
template <class In, class T, int M, bool Scaled>
__device__ __forceinline__ void reductions(const Lanes<In, M>& lanes, bool vec, bool normalize, const T* gbar,
                                           const T* lead, const T (&r)[M], T (&sq)[M], T (&zg)[M], T& lg) {
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) sq[m] = zg[m] = T(0);
  lg = T(0);
  with_vec(vec, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    lanes.template for_features<V, T>([&](int64_t d, const T (&x)[M][V]) {
      T g[V], l[V];
      if (gbar != nullptr) {
        load<V>(gbar + d, g);
        load<V>(lead + d, l);
      }
      PMRL_UNROLL
      for (int v = 0; v < V; ++v) {
        PMRL_UNROLL
        for (int m = 0; m < M; ++m) {
          const T xs = Scaled ? r[m] * x[m][v] : x[m][v];
          if (normalize) sq[m] += xs * xs;
          if (gbar != nullptr) zg[m] += xs * g[v];
        }
        if (gbar != nullptr) lg += l[v] * g[v];
      }
    });
  });
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    sq[m] = group_sum(sq[m], lanes.group);
    zg[m] = group_sum(zg[m], lanes.group);
  }
  lg = group_sum(lg, lanes.group);
}

// A minimum of one block per multiprocessor in the bounds: without it ptxas capped bf16/fp16 at M = 6 to 128
// registers and spilled.
template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads, 1) backward_kernel(const BackwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  const int64_t i = lanes.valid ? lanes.instance : 0;
  const T* gbar = args.grad_lead ? static_cast<const T*>(args.grad_lead) + i * args.dim : nullptr;
  const T* lead = static_cast<const T*>(args.lead) + i * args.dim;
  T sq[M], zg[M];
  T lg = T(0);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) sq[m] = zg[m] = T(0);
  T r[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = T(1);
  if (args.normalize || gbar != nullptr) {
    reductions<In, T, M, false>(lanes, vec, args.normalize, gbar, lead, r, sq, zg, lg);
    // The shuffles need every lane of the warp: the whole warp takes the slow path when one instance needs it,
    // and the others keep r = 1, which reproduces their fast-path sums exactly.
    const bool needs = lanes.valid && args.normalize && gram_needs_rescale<T, M>(sq, true);
    if (__any_sync(0xffffffffu, needs)) {
      T scaled[M];
      with_vec(vec, [&](auto vc) { lanes.template rescale<decltype(vc)::value>(true, scaled); });
      PMRL_UNROLL
      for (int m = 0; m < M; ++m) r[m] = needs ? scaled[m] : T(1);
      reductions<In, T, M, true>(lanes, vec, args.normalize, gbar, lead, r, sq, zg, lg);
    }
  }
  // Copies the maths may index at run time (large M), so that sq and zg themselves stay in registers.
  T sq_sum[M], zg_sum[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    sq_sum[m] = sq[m];
    zg_sum[m] = zg[m];
  }
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
  T r_sum[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r_sum[m] = r[m];
  T a[M][M], e[M], out_scale[M];
  backward_coefficients<T, M>(s, u, grad_s, gbar != nullptr, sq_sum, zg_sum, lg, args.normalize, r_sum, a, e,
                              out_scale);
  In* dz = static_cast<In*>(args.dz) + i * args.dz_stride_b;
  with_vec(vec, [&](auto vc) {
    lanes.template write_rows<decltype(vc)::value>(a, r_sum, e, out_scale, r_sum, gbar, dz, args.dz_stride_m);
  });
}

}  // namespace backward_detail

template <int Lo, int Hi>
cudaError_t gram_eig_backward_in(const BackwardArgs& args, cudaStream_t stream) {
  using namespace backward_detail;
  return launch_over_instances<Lo, Hi>(args, {args.lead, args.grad_lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    return backward_kernel<typename Ty::input, typename Ty::compute, decltype(mc)::value>;
  });
}

}  // namespace pmrl::cuda
