// CUDA kernel of gram_eig: S, U and lead of every instance (see kernels.cuh for the layout).
#include "kernels.cuh"

namespace pmrl::cuda {
namespace {

// Not inlined: the eigen-solver is compiled once per (T, M) and shared by the input dtypes that compute in float
// (float, half, bfloat16), which cuts the build time of this file by about a third. Its arguments pass through
// local memory once per instance, nothing next to the M x D loads.
template <class T, int M>
__device__ __noinline__ void spectrum(T (&g)[M][M], bool normalize, Spectrum<T, M>& sp) {
  gram_spectrum<T, M>(g, normalize, sp);
}

template <class In, class T, int M>
__global__ void __launch_bounds__(kThreads) forward_kernel(const ForwardArgs args, int group, bool vec) {
  const Lanes<In, M> lanes(args.z, args.batch, args.dim, group);
  // The lower triangle of z_m . z_k, in registers: only constant indices touch acc (the M x M matrix handed to
  // the maths below may be indexed at run time for large M, which would put it in local memory).
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
          for (int v = 0; v < V; ++v) acc[m * (m + 1) / 2 + k] += x[m][v] * x[k][v];
        }
      }
    });
  });
  T g[M][M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int k = 0; k <= m; ++k) g[k][m] = g[m][k] = group_sum(acc[m * (m + 1) / 2 + k], group);
  }
  Spectrum<T, M> sp;
  spectrum<T, M>(g, args.normalize, sp);
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
  const T* no_extra = nullptr;
  T* lead = static_cast<T*>(args.lead) + i * args.dim;
  with_vec(vec, [&](auto vc) { lanes.template write_rows<decltype(vc)::value>(coef, no_gbar, no_extra, lead, 0); });
}

}  // namespace

cudaError_t gram_eig_forward(const ForwardArgs& args, cudaStream_t stream) {
  return launch_over_instances(args, {args.lead}, stream, [](auto types, auto mc) {
    using Ty = decltype(types);
    return forward_kernel<typename Ty::input, typename Ty::compute, decltype(mc)::value>;
  });
}

}  // namespace pmrl::cuda
