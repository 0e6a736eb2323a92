// Eigen-decomposition of one symmetric M x M matrix, as reference.eigh_descending defines it: eigenvalues
// descending and clamped at 0, every eigenvector column signed so that it sums to >= 0 (0 counts as +), and
// NaN in every output when an input entry is not finite.
#pragma once

#include "pmrl/common.h"

namespace pmrl {

// One Jacobi rotation of the pair (p, q), p < q, when a_pq passes the rotation test; true when it rotated.
template <class T, int M>
PMRL_HD bool jacobi_rotate(T a[M][M], T v[M][M], int p, int q) {
  using N = Num<T>;
  const T apq = a[p][q];
  // written without sqrt (the check runs M^2 / 2 times a sweep); the product of the diagonal entries is scaled by
  // tol first so that it cannot overflow
  const T tol = T(kJacobiRelTol) * N::eps();
  if (!(apq * apq > tol * N::abs(a[p][p]) * (tol * N::abs(a[q][q])))) return false;
  // t = tan of the rotation angle, the root of t^2 + 2 theta t - 1 = 0 of smaller magnitude; written so that
  // theta^2 cannot overflow.
  const T theta = (a[q][q] - a[p][p]) / (T(2) * apq);
  const T at = N::abs(theta);
  T t = T(1) / (at + (at > T(1) ? at * N::sqrt(T(1) + T(1) / (at * at)) : N::sqrt(T(1) + at * at)));
  if (theta < T(0)) t = -t;
  a[p][q] = a[q][p] = T(0);
  if (t == T(0)) return true;  // a_pq is negligible against the diagonal gap: dropping it is the rotation
  const T c = T(1) / N::sqrt(T(1) + t * t);
  const T s = t * c;
  a[p][p] -= t * apq;
  a[q][q] += t * apq;
  PMRL_UNROLL
  for (int r = 0; r < M; ++r) {
    if (r != p && r != q) {
      const T arp = a[r][p], arq = a[r][q];
      a[r][p] = a[p][r] = c * arp - s * arq;
      a[r][q] = a[q][r] = s * arp + c * arq;
    }
    const T vrp = v[r][p], vrq = v[r][q];
    v[r][p] = c * vrp - s * vrq;
    v[r][q] = s * vrp + c * vrq;
  }
  return true;
}

// Cyclic Jacobi: a := diag(eigenvalues), v := the eigenvectors (columns), a V = V diag on return.
// A pair (p, q) is rotated only while a_pq^2 > (kJacobiRelTol eps)^2 |a_pp a_qq|, the criterion that gives small eigenvalues
// high relative accuracy; the sweep cap bounds the loop on any input.
template <class T, int M>
PMRL_HD void jacobi_eigh(T a[M][M], T v[M][M]) {
  using N = Num<T>;
  PMRL_UNROLL
  for (int r = 0; r < M; ++r) {
    PMRL_UNROLL
    for (int c = 0; c < M; ++c) v[r][c] = T(r == c);
  }
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    // Both loops run over all M so that their trip counts are constants: nvcc then unrolls them fully and a and v
    // stay in registers (a q loop starting at p + 1 kept them in local memory from M = 5 on).
    PMRL_UNROLL
    for (int p = 0; p < M; ++p) {
      PMRL_UNROLL
      for (int q = 0; q < M; ++q) {
        if (q > p) rotated = jacobi_rotate<T, M>(a, v, p, q) || rotated;
      }
    }
    if (!rotated) break;
  }
}

// lam descending (a stable sort, so exact ties keep the solver's order), then clamped at 0; columns of u follow.
template <class T, int M>
PMRL_HD void sort_descending_clamped(T lam[M], T u[M][M]) {
  PMRL_UNROLL
  for (int pass = 0; pass < M - 1; ++pass) {
    PMRL_UNROLL
    for (int k = 0; k < M - 1; ++k) {
      if (lam[k] < lam[k + 1]) {
        const T l = lam[k];
        lam[k] = lam[k + 1];
        lam[k + 1] = l;
        PMRL_UNROLL
        for (int r = 0; r < M; ++r) {
          const T x = u[r][k];
          u[r][k] = u[r][k + 1];
          u[r][k + 1] = x;
        }
      }
    }
  }
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) lam[k] = lam[k] > T(0) ? lam[k] : T(0);
}

// pmrl_kernels.terms.canonical_sign: the sign that makes each column sum >= 0. A sum within kSignTol of 0 is a tie
// (exactly 0 for M = 2 with the rows pointing apart) that rounding would break at random: there the first entry
// with |u_r| > kSignTol decides, and a column with none keeps its sign.
template <class T, int M>
PMRL_HD void canonical_signs(T u[M][M]) {
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) {
    T sum = T(0);
    T first = T(0);
    PMRL_UNROLL
    for (int r = 0; r < M; ++r) {
      sum += u[r][k];
      if (first == T(0) && Num<T>::abs(u[r][k]) > T(kSignTol)) first = u[r][k];
    }
    const T key = Num<T>::abs(sum) > T(kSignTol) ? sum : first;
    if (key < T(0)) {
      PMRL_UNROLL
      for (int r = 0; r < M; ++r) u[r][k] = -u[r][k];
    }
  }
}

// Eigenvalues lam (descending, >= 0) and eigenvectors u (columns, canonical signs) of symmetric g; g is
// overwritten. A non-finite entry makes every output NaN: the NaN stays in this instance.
template <class T, int M>
PMRL_HD void eigh_descending(T g[M][M], T lam[M], T u[M][M]) {
  bool finite = true;
  PMRL_UNROLL
  for (int r = 0; r < M; ++r) {
    PMRL_UNROLL
    for (int c = 0; c < M; ++c) finite = finite && is_finite(g[r][c]);
  }
  if (!finite) {
    PMRL_UNROLL
    for (int r = 0; r < M; ++r) {
      lam[r] = quiet_nan<T>();
      PMRL_UNROLL
      for (int c = 0; c < M; ++c) u[r][c] = quiet_nan<T>();
    }
    return;
  }
  jacobi_eigh<T, M>(g, u);
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) lam[k] = g[k][k];
  sort_descending_clamped<T, M>(lam, u);
  canonical_signs<T, M>(u);
}

}  // namespace pmrl
