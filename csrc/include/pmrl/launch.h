// Raw-pointer launchers of gram_eig and its backward, one set per backend. The torch binding (csrc/bindings.cpp)
// checks and prepares the tensors; the launchers only see pointers, so the CUDA ones compile without torch.
#pragma once

#include <cstdint>

#include "pmrl/common.h"

namespace pmrl {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// The M input rows: row m of instance i starts at ptr[m] + i * stride[m] (in elements); features are contiguous.
// The M tensors may be separate allocations or strided views of one [B, M, D] tensor: nothing is stacked.
struct Rows {
  const void* ptr[kMaxM];
  int64_t stride[kMaxM];
};

// Lanes a CUDA group gives one instance: the smallest power of two, at most max_lanes, whose lanes cover D in one
// step of `vec` features each; max_lanes outside the powers of two in [1, 32] counts as 32. Every lane of a group
// runs its instance's per-instance maths, a large share of the forward at small M (see docs/results.md, "Gram
// eigen-solve on CUDA"), so a warp of fewer lanes an instance solves more instances at once, each lane walking more
// of D.
inline int lanes_per_instance(int64_t dim, int vec, int max_lanes) {
  int group = (max_lanes >= 1 && max_lanes <= 32 && (max_lanes & (max_lanes - 1)) == 0) ? max_lanes : 32;
  while (group > 1 && int64_t(group / 2) * vec >= dim) group /= 2;
  return group;
}

// Outputs are contiguous, in the compute type (double for kFloat64 input, float otherwise):
// s [B, M], u [B, M, M], lead [B, D].
struct ForwardArgs {
  Rows z;
  DType dtype;
  int m;
  int64_t batch, dim;
  bool normalize;
  void* s;
  void* u;
  void* lead;
};

// s, u, grad_s [B, M] and grad_lead [B, D] are contiguous, in the compute type; grad_s and grad_lead may be null
// (a zero gradient). dz [B, M, D] is in the input dtype, features contiguous: row (i, m) starts at
// dz + i * dz_stride_b + m * dz_stride_m.
struct BackwardArgs {
  Rows z;
  DType dtype;
  int m;
  int64_t batch, dim;
  bool normalize;
  const void* s;
  const void* u;
  const void* grad_s;
  const void* grad_lead;
  void* dz;
  int64_t dz_stride_b, dz_stride_m;
};

template <class In, class T>
struct Types {
  using input = In;     // storage type of the rows and of dL/dz
  using compute = T;    // type of the maths and of S, U, lead
};

// Calls f(Types<In, T>{}, std::integral_constant<int, M>{}) for the input dtype and M (in [Lo, Hi], which the caller
// has checked). Half and BFloat16 are the backend's 16-bit storage types (c10::Half / __half, ...); the maths runs
// in float for them, as for float.
template <class Half, class BFloat16, int Lo = kMinM, int Hi = kMaxM, class F>
void dispatch_types(DType dtype, int m, F&& f) {
  dispatch_m<Lo, Hi>(m, [&](auto mc) {
    switch (dtype) {
      case DType::kFloat64: return f(Types<double, double>{}, mc);
      case DType::kFloat32: return f(Types<float, float>{}, mc);
      case DType::kFloat16: return f(Types<Half, float>{}, mc);
      case DType::kBFloat16: return f(Types<BFloat16, float>{}, mc);
    }
  });
}

namespace cpu {
void gram_eig_forward(const ForwardArgs& args);
void gram_eig_backward(const BackwardArgs& args);
}  // namespace cpu

}  // namespace pmrl

#if defined(PMRL_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

namespace pmrl::cuda {
// Enqueue on `stream`; return the launch error (no synchronisation).
cudaError_t gram_eig_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t gram_eig_backward(const BackwardArgs& args, cudaStream_t stream);
}  // namespace pmrl::cuda
#endif
