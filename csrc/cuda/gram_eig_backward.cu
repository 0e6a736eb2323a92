// CUDA kernel of gram_eig_backward: dL/dz of every instance (see kernels.cuh for the layout).
#include "kernels.cuh"

namespace pmrl::cuda {
namespace {

template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads) backward_kernel(const BackwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  const int64_t i = lanes.valid ? lanes.instance : 0;
  const T* gbar = args.grad_lead ? static_cast<const T*>(args.grad_lead) + i * args.dim : nullptr;
  const T* lead = static_cast<const T*>(args.lead) + i * args.dim;
  T sq[M], zg[M];
  T lg = T(0);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) sq[m] = zg[m] = T(0);
  if (args.normalize || gbar != nullptr) {
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
            if (args.normalize) sq[m] += x[m][v] * x[m][v];
            if (gbar != nullptr) zg[m] += x[m][v] * g[v];
          }
          if (gbar != nullptr) lg += l[v] * g[v];
        }
      });
    });
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) {
      sq[m] = group_sum(sq[m], group);
      zg[m] = group_sum(zg[m], group);
    }
    lg = group_sum(lg, group);
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
  T a[M][M], e[M];
  backward_coefficients<T, M>(s, u, grad_s, gbar != nullptr, sq_sum, zg_sum, lg, args.normalize, a, e);
  In* dz = static_cast<In*>(args.dz) + i * args.dz_stride_b;
  with_vec(vec, [&](auto vc) { lanes.template write_rows<decltype(vc)::value>(a, e, gbar, dz, args.dz_stride_m); });
}

}  // namespace

cudaError_t gram_eig_backward(const BackwardArgs& args, cudaStream_t stream) {
  return launch_over_instances(args, {args.lead, args.grad_lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    return backward_kernel<typename Ty::input, typename Ty::compute, decltype(mc)::value>;
  });
}

}  // namespace pmrl::cuda
