// The per-instance maths of gram_eig and of its backward, between the reductions over D (which each backend
// does its own way) and the pass that writes lead or dL/dz. Follows pmrl_kernels/reference.py term by term:
// see its docstring for the rule that keeps the singular cases finite (x / (x^2 + floor^2) in place of 1/x).
#pragma once

#include "pmrl/eigen.h"

namespace pmrl {

// 1 / max(||z||, NORM_EPS) from ||z||^2, as F.normalize divides; NaN stays NaN.
template <class T>
PMRL_HD T inverse_norm(T sq) {
  const T norm = Num<T>::sqrt(sq);
  return T(1) / (norm < T(kNormEps) ? T(kNormEps) : norm);
}

template <class T, int M>
struct Spectrum {
  T s[M];          // singular values of Zn, descending
  T u[M][M];       // eigenvectors of G = Zn Zn^T (columns), canonical signs
  T lead_coef[M];  // lead = sum_m lead_coef[m] * z_m (raw rows)
};

// From the raw Gram matrix g[m][n] = z_m . z_n (full, overwritten) to S, U and the coefficients of lead.
template <class T, int M>
PMRL_HD void gram_spectrum(T g[M][M], bool normalize, Spectrum<T, M>& sp) {
  T inv_norm[M];
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) inv_norm[m] = normalize ? inverse_norm(g[m][m]) : T(1);
  if (normalize) {
    PMRL_UNROLL_M
    for (int m = 0; m < M; ++m) {
      PMRL_UNROLL_M
      for (int n = 0; n < M; ++n) g[m][n] *= inv_norm[m] * inv_norm[n];
    }
  }
  T lam[M];
  eigh_descending<T, M>(g, lam, sp.u);
  PMRL_UNROLL_M
  for (int k = 0; k < M; ++k) sp.s[k] = Num<T>::sqrt(lam[k]);
  // lead = Zn^T u_1 / sigma_1, with 1/sigma_1 floored at the dtype's smallest normal: all-zero rows give lead 0.
  const T inv_s1 = safe_inverse(sp.s[0], Num<T>::tiny());
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) sp.lead_coef[m] = sp.u[m][0] * inv_norm[m] * inv_s1;
}

// Reductions over D the backward takes, on the raw rows z and gbar = dL/dlead:
//   sq[m] = z_m . z_m (read only when normalize), zg[m] = z_m . gbar and lg = lead . gbar (read only with gbar).
// Writes a and e such that dL/dz_m = sum_n a[m][n] z_n + e[m] gbar. grad_s (M values) may be null.
//
// In matrix form (PMRL.md): dL/dZn = C Zn + u_1 gbar^T / sigma_1 with C = U K U^T, K diagonal g_k / sigma_k plus
// the lead terms in its first row and column. The normalisation backward needs dL/dzn_m . zn_m, which is
// (C G)_mm + (u_m1 / sigma_1) (zn_m . gbar) with G = U diag(lambda) U^T: no extra pass over D.
template <class T, int M>
PMRL_HD void backward_coefficients(const T s[M], const T u[M][M], const T* grad_s, bool has_grad_lead,
                                   const T sq[M], const T zg[M], T lg, bool normalize, T a[M][M], T e[M]) {
  const T tiny = Num<T>::tiny();
  T lam[M];
  PMRL_UNROLL_M
  for (int k = 0; k < M; ++k) lam[k] = s[k] * s[k];
  const T inv_s1 = safe_inverse(s[0], tiny);

  T inv_norm[M];
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) inv_norm[m] = normalize ? inverse_norm(sq[m]) : T(1);

  T k[M][M];
  PMRL_UNROLL_M
  for (int i = 0; i < M; ++i) {
    PMRL_UNROLL_M
    for (int j = 0; j < M; ++j) k[i][j] = T(0);
  }
  if (grad_s != nullptr) {
    const T floor_sq = T(kSigmaEps) * s[0] * T(kSigmaEps) * s[0] + tiny;
    PMRL_UNROLL_M
    for (int j = 0; j < M; ++j) k[j][j] = grad_s[j] * safe_inverse(s[j], floor_sq);
  }
  T r[M];   // dL/dZn = C Zn + r gbar^T
  T zng[M];  // zn_m . gbar
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) {
    r[m] = has_grad_lead ? u[m][0] * inv_s1 : T(0);
    zng[m] = has_grad_lead ? zg[m] * inv_norm[m] : T(0);
  }
  if (has_grad_lead) {
    const T gap_floor_sq = T(kGapEps) * lam[0] * T(kGapEps) * lam[0] + tiny;
    PMRL_UNROLL_M
    for (int j = 1; j < M; ++j) {
      T b = T(0);
      PMRL_UNROLL_M
      for (int m = 0; m < M; ++m) b += u[m][j] * zng[m];
      const T h = b * safe_inverse(lam[0] - lam[j], gap_floor_sq) * inv_s1;
      k[j][0] += h;
      k[0][j] += h;
    }
    k[0][0] -= lg * inv_s1 * inv_s1;
  }

  T uk[M][M];  // U K
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL_M
    for (int j = 0; j < M; ++j) {
      T acc = T(0);
      PMRL_UNROLL_M
      for (int l = 0; l < M; ++l) acc += u[m][l] * k[l][j];
      uk[m][j] = acc;
    }
  }
  PMRL_UNROLL_M
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL_M
    for (int n = 0; n < M; ++n) {
      T c = T(0);
      PMRL_UNROLL_M
      for (int j = 0; j < M; ++j) c += uk[m][j] * u[n][j];
      a[m][n] = inv_norm[m] * c * inv_norm[n];
    }
    // Normalisation backward: (I - zn zn^T) / ||z||, the projection skipped for a row of norm <= NORM_EPS.
    if (normalize && !(Num<T>::sqrt(sq[m]) <= T(kNormEps))) {
      T radial = r[m] * zng[m];
      PMRL_UNROLL_M
      for (int j = 0; j < M; ++j) radial += uk[m][j] * lam[j] * u[m][j];
      a[m][m] -= radial * inv_norm[m] * inv_norm[m];
    }
    e[m] = inv_norm[m] * r[m];
  }
}

}  // namespace pmrl
