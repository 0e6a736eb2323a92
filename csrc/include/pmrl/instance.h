// The per-instance maths of gram_eig and of its backward, between the reductions over D (which each backend
// does its own way) and the pass that writes lead or dL/dz. Follows pmrl_kernels/reference.py term by term:
// docs/maths.md, "Singular cases", gives the rule that keeps the singular cases finite (x / (x^2 + floor^2) in place of 1/x).
#pragma once

#include "pmrl/eigen.h"

namespace pmrl {

// Two powers of two keep every intermediate in range (docs/maths.md, "Scale"):
// - row scales r_m: the rows reach the maths as zhat_m = r_m z_m. The kernels pass r_m = 1 unless the Gram matrix
//   of the raw rows over- or underflowed (gram_needs_rescale); then they take the rows' largest magnitudes in one
//   more pass (row_scales) and form the Gram matrix of the scaled rows. With normalize each row has its own scale
//   (normalisation is per row); without, the rows share one.
// - an instance scale c: the maths works on Zn_c = c Zn, with c the power of two that brings sigma_1 (the largest
//   row norm of Zn, in the forward) near 1. Then S_c, the eigenvalue gaps and every coefficient are of order 1
//   whatever the rows' scale, and S = S_c / c.
// The passes over D apply r to the rows they read: lead = sum_m lead_coef[m] (r_m z_m) and
// dL/dz_m = r_m (out_scale[m] (sum_n a[m][n] (r_n z_n) + e[m] gbar)), multiplied in that order (the product
// r_m out_scale[m] alone can overflow where dL/dz does not).

// 1 / max(||zhat||, r NORM_EPS) from ||zhat||^2: zhat / max(||zhat||, r NORM_EPS) = z / max(||z||, NORM_EPS), as
// F.normalize divides; NaN stays NaN.
template <class T>
PMRL_HD T inverse_norm(T sq, T r) {
  const T norm = Num<T>::sqrt(sq);
  const T floor = r * T(kNormEps);
  return T(1) / (norm < floor ? floor : norm);
}

// Whether squares of the raw rows cannot be used: a diagonal entry of their Gram matrix (or the backward's
// ||z_m||^2) is not finite, or is below sqrt(tiny), where the products lost precision (with normalize per row:
// every row is normalised on its own; without, for the largest: the rows share one scale). An exactly zero row
// also asks; row_scales then leaves it as it is, as it does for a non-finite input (the result is NaN anyway).
template <class T, int M>
PMRL_HD bool gram_needs_rescale(const T (&diag)[M], bool normalize) {
  const T low = Num<T>::sqrt(Num<T>::tiny());
  T gmax = T(0);
  bool finite = true, small = false;
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    finite = finite && diag[m] <= Num<T>::max();
    small = small || diag[m] < low;
    gmax = diag[m] > gmax ? diag[m] : gmax;
  }
  return !finite || (normalize ? small : gmax < low);
}

// The scales r_m from the rows' largest magnitudes amax_m (each its own with normalize, the instance's largest
// for all without); all 1 when an input is not finite (the result is then NaN anyway) or the instance is 0.
template <class T, int M>
PMRL_HD void row_scales(const T amax[M], bool normalize, T r[M]) {
  T top = T(0);
  bool finite = true;
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    finite = finite && amax[m] <= Num<T>::max();
    top = amax[m] > top ? amax[m] : top;
  }
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) r[m] = !finite ? T(1) : scale_for(normalize ? amax[m] : top);
}

template <class T, int M>
struct Spectrum {
  T s[M];          // singular values of Zn, descending
  T u[M][M];       // eigenvectors of G = Zn Zn^T (columns), canonical signs
  T lead_coef[M];  // lead = sum_m lead_coef[m] * (r_m z_m)
};

// From the Gram matrix g[m][n] = zhat_m . zhat_n of the scaled rows (full, overwritten) to S, U and the
// coefficients of lead. dim is D: singular values past it are exact zeros.
template <class T, int M>
PMRL_HD void gram_spectrum(T g[M][M], const T r[M], bool normalize, int64_t dim, Spectrum<T, M>& sp) {
  // w_m = c / max(||zhat_m||, r_m NORM_EPS): the scale of row m of Zn_c per unit of zhat_m, capped at the largest
  // finite value (reached only by a zero row, where c / NORM_EPS can overflow)
  T w[M];
  T top = T(0);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    w[m] = normalize ? inverse_norm(g[m][m], r[m]) : T(1);
    const T norm = Num<T>::sqrt(g[m][m]) * w[m];  // ||zn_m||
    top = norm > top ? norm : top;
  }
  const T c = scale_for(top);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) w[m] = cap_finite(w[m] * c);
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int n = 0; n < M; ++n) g[m][n] = (g[m][n] * w[m]) * w[n];  // w_m w_n alone can overflow
  }
  T lam[M];
  eigh_descending<T, M>(g, lam, sp.u);
  // S = S_c / c, and without normalisation the rows were r Z: S = S_c / (c r)
  const T undo = normalize ? T(1) : r[0];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) sp.s[k] = k < dim ? Num<T>::sqrt(lam[k]) / c / undo : T(0) * lam[k];  // NaN stays
  // lead = Zn_c^T u_1 / sigma_1c, with 1/sigma_1c floored at the dtype's smallest normal: all-zero rows give 0
  const T inv_s1 = safe_inverse(Num<T>::sqrt(lam[0]), Num<T>::tiny());
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) sp.lead_coef[m] = sp.u[m][0] * w[m] * inv_s1;
}

// Reductions over D the backward takes, on the scaled rows zhat_m = r_m z_m and gbar = dL/dlead:
//   sq[m] = zhat_m . zhat_m (read only when normalize) and zg[m] = zhat_m . gbar (read only with gbar); lead . gbar
//   is b_1 / sigma_1c (b_k = u_k . (Zn_c gbar), u_1 the leading eigenvector: column 0), so lead is not read. Without normalize the kernels pass r = 1 and the raw reductions; the instance scale c, from
//   sigma_1 (no pass over D), is then written to r, so that the pass over D scales the rows before the
//   coefficients meet them (c a[m][n] alone can overflow where dL/dz does not: c reaches 2^126 in float32).
// Writes a, e and out_scale (and r without normalize) such that
// dL/dz_m = r_m (out_scale[m] (sum_n a[m][n] (r_n z_n) + e[m] gbar)). grad_s (M values) may be null.
//
// In matrix form (docs/maths.md, "The backward in matrix form"), on Zn_c = c Zn: dL/dZn_c = C Zn_c + u_1 gbar^T
// / sigma_1c with C = U K U^T, K diagonal g_k / sigma_kc plus the lead terms in its first row and column. The
// normalisation backward needs dL/dzn_m . zn_m, which is (C G_c)_mm + (u_m1 / sigma_1c) (zn_cm . gbar) with
// G_c = U diag(lambda_c) U^T: no extra pass over D. Then dL/dz_m = r_m c / max(||zhat_m||, r_m NORM_EPS) times the
// projected dL/dzn_cm.
template <class T, int M>
PMRL_HD void backward_coefficients(const T s_in[M], const T u[M][M], const T* grad_s, bool has_grad_lead,
                                   const T sq[M], const T zg[M], bool normalize, T r[M],
                                   T a[M][M], T e[M], T out_scale[M]) {
  const T tiny = Num<T>::tiny();
  const T c = scale_for(s_in[0]);
  T s[M], lam[M];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) {
    s[k] = s_in[k] * c;
    lam[k] = s[k] * s[k];
  }
  const T inv_s1 = safe_inverse(s[0], tiny);

  T w[M];    // c / max(||zhat_m||, r_m NORM_EPS): zn_cm = w_m zhat_m; 1 without normalize, where r_m = c
  T zng[M];  // zn_cm . gbar
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    w[m] = normalize ? cap_finite(inverse_norm(sq[m], r[m]) * c) : T(1);
    zng[m] = has_grad_lead ? zg[m] * (normalize ? w[m] : c) : T(0);
    if (!normalize) r[m] = c;
  }

  T k[M][M];
  PMRL_UNROLL
  for (int i = 0; i < M; ++i) {
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) k[i][j] = T(0);
  }
  if (grad_s != nullptr) {
    const T floor_sq = T(kSigmaEps) * s[0] * T(kSigmaEps) * s[0] + tiny;
    // dL/dsigma_kc = dL/dsigma_k / c
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) k[j][j] = grad_s[j] / c * safe_inverse(s[j], floor_sq);
  }
  T v[M];  // dL/dZn_c = C Zn_c + v gbar^T
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) v[m] = has_grad_lead ? u[m][0] * inv_s1 : T(0);
  if (has_grad_lead) {
    const T gap_floor_sq = T(kGapEps) * lam[0] * T(kGapEps) * lam[0] + tiny;
    T lg = T(0);  // lead . gbar = b_1 / sigma_1c
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) {
      T b = T(0);
      PMRL_UNROLL
      for (int m = 0; m < M; ++m) b += u[m][j] * zng[m];
      if (j == 0) {
        lg = b * inv_s1;
        continue;
      }
      const T h = b * safe_inverse(lam[0] - lam[j], gap_floor_sq) * inv_s1;
      k[j][0] += h;
      k[0][j] += h;
    }
    k[0][0] -= lg * inv_s1 * inv_s1;
  }

  T uk[M][M];  // U K
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) {
      T acc = T(0);
      PMRL_UNROLL
      for (int l = 0; l < M; ++l) acc += u[m][l] * k[l][j];
      uk[m][j] = acc;
    }
  }
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    PMRL_UNROLL
    for (int n = 0; n < M; ++n) {
      T cmn = T(0);
      PMRL_UNROLL
      for (int j = 0; j < M; ++j) cmn += uk[m][j] * u[n][j];
      a[m][n] = cmn * w[n];
    }
    // Normalisation backward: (I - zn zn^T) / ||z||, the projection skipped for a row of norm <= NORM_EPS. On Zn_c
    // the radial part is (dL/dzn_c . zn_c) zn_c / c^2.
    if (normalize && !(Num<T>::sqrt(sq[m]) <= r[m] * T(kNormEps))) {
      T radial = v[m] * zng[m];
      PMRL_UNROLL
      for (int j = 0; j < M; ++j) radial += uk[m][j] * lam[j] * u[m][j];
      a[m][m] -= radial * w[m] / (c * c);
    }
    e[m] = v[m];
    out_scale[m] = w[m];
  }
}

}  // namespace pmrl
