// Device-side pieces shared by the CUDA kernels of gram_eig (gram_eig_forward.cu) and of its backward
// (gram_eig_backward.cu). No torch header anywhere under csrc/cuda: CI compiles each .cu file with a bare
// `nvcc -c -std=c++17 -arch=sm_90 -Icsrc/include`.
//
// One group of G lanes per instance (G a power of two <= 32 chosen from D, so short rows do not leave lanes
// idle; a group never straddles a warp). A group walks D with its lanes on consecutive features (coalesced,
// 4-element vector loads when every row allows them), accumulates the reductions in registers in the compute
// type, sums them with warp shuffles, runs the per-instance maths, then walks D once more to write lead or dL/dz.
// An instance whose reductions over- or underflow walks D twice more (its rows' magnitudes, then the reductions of
// the scaled rows). Offsets are 64-bit.
//
// The maths has two forms. Below kWarpMathsMinM every lane runs pmrl/instance.h on the whole M x M matrices in
// its registers (no shared memory, no synchronisation). From kWarpMathsMinM on, a group is a whole warp and the
// matrices are spread one row a lane (pmrl/warp_instance.h: the round-robin Jacobi solve), since M x M arrays a
// lane no longer fit in registers; the backward stages its coefficient rows in shared memory for the pass over D.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <initializer_list>
#include <type_traits>

#include "pmrl/launch.h"
#include "pmrl/warp_instance.h"

namespace pmrl::cuda {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // features per lane and step when every row is 4-element aligned
constexpr int kWarpMathsMinM = 9;  // M x M arrays a lane fit in registers up to M = 8 (benchmarks/static_check.py)

// The warp of pmrl/warp_instance.h: the hardware warp, every lane taking part in every exchange.
struct HardwareWarp {
  static constexpr int kSize = 32;
  __device__ __forceinline__ int lane() const { return threadIdx.x & 31; }
  template <class T>
  __device__ __forceinline__ T shfl(T x, int src) const {
    return __shfl_sync(0xffffffffu, x, src);
  }
  template <class T>
  __device__ __forceinline__ T shfl_xor(T x, int mask) const {
    return __shfl_xor_sync(0xffffffffu, x, mask);
  }
  __device__ __forceinline__ unsigned ballot(bool p) const { return __ballot_sync(0xffffffffu, p); }
};

// Conversions between the storage and the compute type: implicit for float and double, intrinsics for the 16-bit
// types (torch's build disables their implicit conversions).
template <class T>
__device__ __forceinline__ T widen(T x) {
  return x;
}
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Out, class T>
__device__ __forceinline__ Out narrow(T x) {
  if constexpr (std::is_same_v<Out, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<Out, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// V consecutive elements moved by one (vector) memory access; the caller guarantees the alignment.
template <class E, int V>
struct alignas(sizeof(E) * V) Pack {
  E v[V];
};

template <int V, class T, class In>
__device__ __forceinline__ void load(const In* p, T (&out)[V]) {
  const Pack<In, V> pack = *reinterpret_cast<const Pack<In, V>*>(p);
  PMRL_UNROLL
  for (int v = 0; v < V; ++v) out[v] = widen(pack.v[v]);
}

template <int V, class T, class Out>
__device__ __forceinline__ void store(Out* p, const T (&x)[V]) {
  Pack<Out, V> pack;
  PMRL_UNROLL
  for (int v = 0; v < V; ++v) pack.v[v] = narrow<Out>(x[v]);
  *reinterpret_cast<Pack<Out, V>*>(p) = pack;
}

// Sum over the `group` lanes of an instance (aligned, a power of two, the same in the whole warp); every lane of the
// warp must call it. Unrolled over the five possible offsets, largest first, each taken while below group.
template <class T>
__device__ __forceinline__ T group_sum(T v, int group) {
  PMRL_UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
    if (offset < group) v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// NaN-propagating maximum over the `group` lanes; every lane of the warp must call it. Only the rare rescale
// takes it: a loop, which holds fewer registers than the unrolled form.
template <class T>
__device__ __forceinline__ T group_max(T v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v || !(o <= Num<T>::max()) ? o : v;
  }
  return v;
}

// Calls f(std::integral_constant<int, V>{}) with V = kVec or 1: one branch for the whole kernel.
template <class F>
__device__ __forceinline__ void with_vec(bool vec, F&& f) {
  if (vec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Where one instance's data lives, and which features this lane reads.
template <class In, int M>
struct Lanes {
  const In* rows[M];
  int64_t instance, dim;  // dim is 0 for the lanes past the batch: they only join the shuffles
  int lane, group;
  bool valid;

  __device__ Lanes(const Rows& z, int64_t batch, int64_t dim_, int group_) : group(group_) {
    const int64_t thread = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    instance = thread / group;
    lane = threadIdx.x & (group - 1);
    valid = instance < batch;
    dim = valid ? dim_ : 0;
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) rows[m] = static_cast<const In*>(z.ptr[m]) + (valid ? instance : 0) * z.stride[m];
  }

  // f(d, x): x[m][v] is feature d + v of row m, for this lane's features.
  template <int V, class T, class F>
  __device__ __forceinline__ void for_features(F&& f) const {
    for (int64_t d = int64_t(lane) * V; d < dim; d += int64_t(group) * V) {
      T x[M][V];
      PMRL_UNROLL
      for (int m = 0; m < M; ++m) load<V>(rows[m] + d, x[m]);
      f(d, x);
    }
  }

  // The scales r of pmrl/instance.h (row_scales) from the rows' largest magnitudes: the slow path of an instance
  // whose reductions over- or underflowed. Every lane of the warp must call it.
  template <int V, class T>
  __device__ void rescale(bool normalize, T (&r)[M]) const {
    T amax[M];
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) amax[m] = T(0);
    for_features<V, T>([&](int64_t, const T (&x)[M][V]) {
      PMRL_UNROLL
      for (int m = 0; m < M; ++m) {
        PMRL_UNROLL
        for (int v = 0; v < V; ++v) {
          const T a = Num<T>::abs(x[m][v]);
          amax[m] = a > amax[m] || !(a <= Num<T>::max()) ? a : amax[m];
        }
      }
    });
    PMRL_UNROLL
    for (int m = 0; m < M; ++m) amax[m] = group_max(amax[m], group);
    row_scales<T, M>(amax, normalize, r);
  }

  // out[r * stride + d] = rout[r] (scale[r] (sum_m a(r, m) (rin[m] z_m[d]) + e[r] extra[d])) for r < R (extra may
  // be null): the rows scaled by rin as the maths saw them (pmrl/instance.h; 1 on the usual path). a(r, m) reads
  // a coefficient from registers or shared memory.
  template <int V, int R, class T, class Out, class Coef>
  __device__ __forceinline__ void write_rows(Coef a, const T (&rin)[M], const T (&e)[R], const T (&scale)[R],
                                             const T (&rout)[R], const T* extra, Out* out, int64_t stride) const {
    for_features<V, T>([&](int64_t d, const T (&x)[M][V]) {
      T g[V];
      PMRL_UNROLL
      for (int v = 0; v < V; ++v) g[v] = T(0);
      if (extra != nullptr) load<V>(extra + d, g);
      PMRL_UNROLL
      for (int r = 0; r < R; ++r) {
        T y[V];
        PMRL_UNROLL
        for (int v = 0; v < V; ++v) {
          y[v] = e[r] * g[v];
          PMRL_UNROLL
          for (int m = 0; m < M; ++m) y[v] += a(r, m) * (rin[m] * x[m][v]);
          y[v] = rout[r] * (scale[r] * y[v]);
        }
        store<V>(out + r * stride + d, y);
      }
    });
  }
};

// The scales r (docs/maths.md, "Scale"): 1, or for an instance whose raw Gram diagonal (the backward: squared
// norms) over- or underflowed the rows' magnitudes. The shuffles need every lane of the warp: the whole warp takes
// the slow path when one instance needs it, and the others keep r = 1, which reproduces their fast-path sums
// exactly. True when a rescale ran.
template <class In, class T, int M>
__device__ __forceinline__ bool rescaled(const Lanes<In, M>& lanes, bool vec, bool normalize, const T (&diag)[M],
                                         T (&r)[M]) {
  const bool needs = lanes.valid && gram_needs_rescale<T, M>(diag, normalize);
  if (!__any_sync(0xffffffffu, needs)) return false;
  T scaled[M];
  with_vec(vec, [&](auto vc) { lanes.template rescale<decltype(vc)::value>(normalize, scaled); });
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = needs ? scaled[m] : T(1);
  return true;
}

// 4-element vector access is valid when D and every row stride are multiples of 4 and every row, and every
// [B, D] tensor of the compute type (lead, its gradient: contiguous, but possibly at an odd storage offset),
// starts aligned. The outputs are fresh allocations with rows of D elements: aligned when D is.
template <class In, class T>
bool allow_vec(const Rows& z, int m, int64_t dim, std::initializer_list<const void*> compute_rows) {
  if (dim % kVec != 0) return false;
  for (int k = 0; k < m; ++k) {
    if (reinterpret_cast<uintptr_t>(z.ptr[k]) % (kVec * sizeof(In)) != 0 || z.stride[k] % kVec != 0) return false;
  }
  for (const void* p : compute_rows) {
    if (reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) != 0) return false;
  }
  return true;
}

// The most lanes an instance gets below kWarpMathsMinM (pmrl::lanes_per_instance): 32, or PMRL_CUDA_MAX_LANES,
// read at each launch so that one process can time several group sizes.
inline int max_lanes() {
  const char* value = std::getenv("PMRL_CUDA_MAX_LANES");
  return value ? std::atoi(value) : 32;
}

// Launches kernel_for(Types<In, T>{}, integral_constant M) (a kernel taking (args, group, vec)) for the
// arguments' dtype and M (in [Lo, Hi]), one group of lanes per instance (a warp from kWarpMathsMinM on);
// compute_rows are the [B, D] tensors of the compute type the kernel reads or writes (null: none).
template <int Lo, int Hi, class Args, class KernelFor>
cudaError_t launch_over_instances(const Args& args, std::initializer_list<const void*> compute_rows,
                                  cudaStream_t stream, KernelFor kernel_for) {
  if (args.batch == 0) return cudaSuccess;
  dispatch_types<__half, __nv_bfloat16, Lo, Hi>(args.dtype, args.m, [&](auto types, auto mc) {
    using Ty = decltype(types);
    const bool vec = allow_vec<typename Ty::input, typename Ty::compute>(args.z, args.m, args.dim, compute_rows);
    const int group = decltype(mc)::value >= kWarpMathsMinM ? 32 : lanes_per_instance(args.dim, vec ? kVec : 1,
                                                                                        max_lanes());
    const int64_t blocks = (args.batch * group + kThreads - 1) / kThreads;
    kernel_for(types, mc)<<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, stream>>>(args, group, vec);
  });
  return cudaGetLastError();
}

// The kernels' instantiations are split by M over several .cu files (gram_eig_{forward,backward}_m*.cu), which
// nvcc compiles in parallel: one (Lo, Hi) range per file. PMRL_M_RANGES(X) calls X(Lo, Hi) for each range; the
// dispatchers in gram_eig_forward.cu and gram_eig_backward.cu pick the range of args.m.
#define PMRL_M_RANGES(X) X(2, 4) X(5, 6) X(7, 8) X(9, 10) X(11, 12) X(13, 14) X(15, 15) X(16, 16)

template <int Lo, int Hi>
cudaError_t gram_eig_forward_in(const ForwardArgs& args, cudaStream_t stream);
template <int Lo, int Hi>
cudaError_t gram_eig_backward_in(const BackwardArgs& args, cudaStream_t stream);

}  // namespace pmrl::cuda
