// CPU kernels of gram_eig and its backward, compiled once per instruction set: gram_eig_cpu.cpp includes this
// file for the baseline ISA, gram_eig_cpu_avx2.cpp for AVX2 + FMA; the dispatcher in gram_eig_cpu.cpp picks one
// at run time. PMRL_CPU_ISA names the namespace of this copy, so the copies never share a symbol.
//
// Instances are split over threads with at::parallel_for. Per instance: one pass over D for the reductions,
// the header maths (pmrl/instance.h), one pass over D that writes lead or dL/dz (the second pass reads the
// instance's rows from L1). The dot products keep kLanes independent partial sums, so the compiler vectorises
// them without reassociating. An instance whose reductions over- or underflow (rows beyond about 1e19, or tiny
// unnormalised instances) takes one more pass for its rows' magnitudes and redoes them on scaled rows
// (pmrl/instance.h). No heap allocation: rows are read in place, 16-bit rows staged into a stack buffer
// a chunk of D at a time.
//
// Deliberately no include guard: each ISA's translation unit includes it exactly once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "pmrl/instance.h"
#include "pmrl/launch.h"

#ifndef PMRL_CPU_ISA
#error "define PMRL_CPU_ISA (the namespace of this instruction-set copy) before including cpu/kernels.h"
#endif

namespace pmrl::cpu::PMRL_CPU_ISA {
namespace {

constexpr int64_t kChunk = 256;  // features per step: the M staged rows stay in L1
constexpr int kLanes = 32;       // partial sums per dot: 4 AVX registers of float, enough to hide FMA latency

// The M rows of one instance as compute-type values, a chunk of D at a time.
template <class In, class T, int M>
struct InstanceRows {
  static constexpr bool kInPlace = std::is_same_v<In, T>;
  using Staging = std::conditional_t<kInPlace, char, T[M][kChunk]>;

  const In* rows[M];
  int64_t dim;

  InstanceRows(const Rows& z, int64_t i, int64_t dim_) : dim(dim_) {
    for (int m = 0; m < M; ++m) rows[m] = static_cast<const In*>(z.ptr[m]) + i * z.stride[m];
  }

  // f(x, d0, n): x[m] points at n values of row m from feature d0 on.
  template <class F>
  void for_chunks(Staging& staging, F&& f) const {
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      const int64_t n = std::min(kChunk, dim - d0);
      const T* x[M];
      for (int m = 0; m < M; ++m) {
        if constexpr (kInPlace) {
          x[m] = rows[m] + d0;
        } else {
          for (int64_t d = 0; d < n; ++d) staging[m][d] = static_cast<T>(rows[m][d0 + d]);
          x[m] = staging[m];
        }
      }
      f(x, d0, n);
    }
  }
};

template <class T>
T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[d + l] * y[d + l];
  }
  for (int l = 0; d < n; ++d, ++l) acc[l] += x[d] * y[d];
  T sum = T(0);
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// out[d] = rout (scale (sum_m w[m] (r[m] x[m][d]) + e * extra[d])) (extra may be null), d < n: the rows scaled
// by r as the maths saw them (pmrl/instance.h; with normalize r = 1 on the usual path).
template <class T, int M>
void combine(const T* const (&x)[M], const T (&w)[M], const T (&r)[M], const T* __restrict extra, T e, T scale,
             T rout, int64_t n, T* __restrict out) {
  if (extra != nullptr) {
    for (int64_t d = 0; d < n; ++d) {
      T acc = e * extra[d];
      for (int m = 0; m < M; ++m) acc += w[m] * (r[m] * x[m][d]);
      out[d] = rout * (scale * acc);
    }
  } else {
    for (int64_t d = 0; d < n; ++d) {
      T acc = T(0);
      for (int m = 0; m < M; ++m) acc += w[m] * (r[m] * x[m][d]);
      out[d] = rout * (scale * acc);
    }
  }
}

// The slow path of an instance whose raw reductions over- or underflowed (pmrl/instance.h, row_scales): the
// rows' largest magnitudes, then the scales r. Rare, so written plainly.
template <class In, class T, int M>
void rescale_rows(const InstanceRows<In, T, M>& inst, typename InstanceRows<In, T, M>::Staging& staging,
                  bool normalize, T (&r)[M]) {
  T amax[M] = {};
  inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t, int64_t n) {
    for (int m = 0; m < M; ++m) {
      for (int64_t d = 0; d < n; ++d) {
        const T v = Num<T>::abs(x[m][d]);
        amax[m] = v > amax[m] || !(v <= Num<T>::max()) ? v : amax[m];
      }
    }
  });
  row_scales<T, M>(amax, normalize, r);
}

template <class In, class T, int M>
void forward_range(const ForwardArgs& args, int64_t begin, int64_t end) {
  typename InstanceRows<In, T, M>::Staging staging;
  for (int64_t i = begin; i < end; ++i) {
    const InstanceRows<In, T, M> inst(args.z, i, args.dim);
    T g[M][M] = {};
    inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t, int64_t n) {
      for (int m = 0; m < M; ++m) {
        for (int k = 0; k <= m; ++k) g[m][k] += dot(x[m], x[k], n);
      }
    });
    T r[M];
    std::fill_n(r, M, T(1));
    T diag[M];
    for (int m = 0; m < M; ++m) diag[m] = g[m][m];
    if (gram_needs_rescale<T, M>(diag, args.normalize)) {
      rescale_rows(inst, staging, args.normalize, r);
      for (int m = 0; m < M; ++m) std::fill_n(g[m], M, T(0));
      inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t, int64_t n) {
        for (int m = 0; m < M; ++m) {
          for (int k = 0; k <= m; ++k) {
            for (int64_t d = 0; d < n; ++d) g[m][k] += (r[m] * x[m][d]) * (r[k] * x[k][d]);
          }
        }
      });
    }
    for (int m = 0; m < M; ++m) {
      for (int k = 0; k < m; ++k) g[k][m] = g[m][k];
    }
    Spectrum<T, M> sp;
    gram_spectrum<T, M>(g, r, args.normalize, args.dim, sp);
    std::copy_n(sp.s, M, static_cast<T*>(args.s) + i * M);
    std::copy_n(&sp.u[0][0], M * M, static_cast<T*>(args.u) + i * M * M);
    T* lead = static_cast<T*>(args.lead) + i * args.dim;
    inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t d0, int64_t n) {
      combine<T, M>(x, sp.lead_coef, r, nullptr, T(0), T(1), T(1), n, lead + d0);
    });
  }
}

template <class In, class T, int M>
void backward_range(const BackwardArgs& args, int64_t begin, int64_t end) {
  const int64_t dim = args.dim;
  typename InstanceRows<In, T, M>::Staging staging;
  T out[kChunk];  // an output row chunk, when dz is not stored in the compute type
  for (int64_t i = begin; i < end; ++i) {
    const InstanceRows<In, T, M> inst(args.z, i, dim);
    const T* gbar = args.grad_lead ? static_cast<const T*>(args.grad_lead) + i * dim : nullptr;
    T sq[M] = {}, zg[M] = {};
    if (args.normalize || gbar != nullptr) {
      inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t d0, int64_t n) {
        for (int m = 0; m < M; ++m) {
          if (args.normalize) sq[m] += dot(x[m], x[m], n);
          if (gbar != nullptr) zg[m] += dot(x[m], gbar + d0, n);
        }
      });
    }
    T r[M];
    std::fill_n(r, M, T(1));
    if (args.normalize && gram_needs_rescale<T, M>(sq, true)) {
      rescale_rows(inst, staging, true, r);
      std::fill_n(sq, M, T(0));
      std::fill_n(zg, M, T(0));
      inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t d0, int64_t n) {
        for (int m = 0; m < M; ++m) {
          for (int64_t d = 0; d < n; ++d) {
            const T xs = r[m] * x[m][d];
            sq[m] += xs * xs;
            if (gbar != nullptr) zg[m] += xs * gbar[d0 + d];
          }
        }
      });
    }
    T s[M], u[M][M];
    std::copy_n(static_cast<const T*>(args.s) + i * M, M, s);
    std::copy_n(static_cast<const T*>(args.u) + i * M * M, M * M, &u[0][0]);
    const T* grad_s = args.grad_s ? static_cast<const T*>(args.grad_s) + i * M : nullptr;
    T a[M][M], e[M], out_scale[M];
    backward_coefficients<T, M>(s, u, grad_s, gbar != nullptr, sq, zg, args.normalize, r, a, e, out_scale);
    In* dz = static_cast<In*>(args.dz) + i * args.dz_stride_b;
    inst.for_chunks(staging, [&](const T* const (&x)[M], int64_t d0, int64_t n) {
      for (int m = 0; m < M; ++m) {
        In* dst = dz + m * args.dz_stride_m + d0;
        const T* extra = gbar ? gbar + d0 : nullptr;
        if constexpr (InstanceRows<In, T, M>::kInPlace) {
          combine<T, M>(x, a[m], r, extra, e[m], out_scale[m], r[m], n, dst);
        } else {
          combine<T, M>(x, a[m], r, extra, e[m], out_scale[m], r[m], n, out);
          for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<In>(out[d]);
        }
      }
    });
  }
}

// Enough instances per task that a thread gets at least 32768 elements (ATen's grain size) of work.
int64_t grain(int m, int64_t dim) { return std::max<int64_t>(1, 32768 / (m * dim)); }

}  // namespace

void gram_eig_forward(const ForwardArgs& args) {
  dispatch_types<c10::Half, c10::BFloat16>(args.dtype, args.m, [&](auto types, auto mc) {
    using Ty = decltype(types);
    at::parallel_for(0, args.batch, grain(args.m, args.dim), [&](int64_t begin, int64_t end) {
      forward_range<typename Ty::input, typename Ty::compute, decltype(mc)::value>(args, begin, end);
    });
  });
}

void gram_eig_backward(const BackwardArgs& args) {
  dispatch_types<c10::Half, c10::BFloat16>(args.dtype, args.m, [&](auto types, auto mc) {
    using Ty = decltype(types);
    at::parallel_for(0, args.batch, grain(args.m, args.dim), [&](int64_t begin, int64_t end) {
      backward_range<typename Ty::input, typename Ty::compute, decltype(mc)::value>(args, begin, end);
    });
  });
}

}  // namespace pmrl::cpu::PMRL_CPU_ISA
