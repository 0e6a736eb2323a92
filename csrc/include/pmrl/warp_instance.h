// The per-instance maths of pmrl/instance.h with the M x M matrices spread over the lanes of one warp: lane l < M
// holds row l of the Gram matrix, of its eigenvectors and of the backward's coefficients, so that no lane holds an
// M x M array (at M = 16 those need 512 registers a lane, which put them in local memory). The eigen-solve is
// Jacobi with the round-robin (Brent-Luk) ordering: each round rotates M / 2 disjoint pairs at once, one pair per
// two lanes; a sweep is M - 1 rounds (M for odd M). Same contract as eigh_descending (pmrl/eigen.h): eigenvalues
// descending and clamped at 0, canonical signs, NaN everywhere for a non-finite input; same rotation test and sweep
// cap. Exactly repeated eigenvalues may come out with another basis of their eigenspace than the cyclic solver's.
//
// The warp W provides: kSize (lanes, a power of two >= M), lane(), shfl(x, src) (x of lane src, for float and
// double), shfl_xor(x, mask) and ballot(p) (bit l: p of lane l). Every lane of the warp calls every function here
// with the same M, so every exchange is reached by all lanes (uniform control flow); lanes >= M carry zero rows.
// On a GPU W is the hardware warp (csrc/cuda/kernels.cuh); the self-test emulates one on the host.
#pragma once

#include "pmrl/instance.h"

namespace pmrl {

// Round-robin ordering of n (even) indices: round t pairs the positions k and n - 1 - k; position 0 holds index 0
// and the others rotate by one each round, so that n - 1 rounds pair every two indices once.
PMRL_HD constexpr int round_robin_index(int pos, int t, int n) { return pos == 0 ? 0 : 1 + (pos - 1 + t) % (n - 1); }

PMRL_HD constexpr int round_robin_partner(int l, int t, int n) {
  const int pos = l == 0 ? 0 : 1 + ((l - 1 - t) % (n - 1) + (n - 1)) % (n - 1);
  return round_robin_index(n - 1 - pos, t, n);
}

// x[i] for a run-time i < M, as selects over the unrolled indices: a run-time index into a register array would
// move it to local memory. The chain starts from a constant, not from x[0]: a select between two loads is folded
// into a load from a selected address, which turns the whole chain back into an indexed access.
template <class T, int M>
PMRL_HD T pick(const T (&x)[M], int i) {
  T out = T(0);
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) out = i == k ? x[k] : out;
  return out;
}

template <class T, int M>
PMRL_HD void put(T (&x)[M], int i, T value) {
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) x[k] = i == k ? value : x[k];
}

template <class W, class T>
PMRL_HD T warp_sum(const W& w, T x) {
  PMRL_UNROLL
  for (int offset = W::kSize / 2; offset > 0; offset /= 2) x += w.shfl_xor(x, offset);
  return x;
}

template <class W, class T>
PMRL_HD T warp_max(const W& w, T x) {
  PMRL_UNROLL
  for (int offset = W::kSize / 2; offset > 0; offset /= 2) {
    const T o = w.shfl_xor(x, offset);
    x = o > x ? o : x;
  }
  return x;
}

// all[n] = x of lane n, n < M, in every lane.
template <class W, class T, int M>
PMRL_HD void warp_gather(const W& w, T x, T (&all)[M]) {
  PMRL_UNROLL
  for (int n = 0; n < M; ++n) all[n] = w.shfl(x, n);
}

// One round t of the parallel Jacobi sweep on rows a (of A) and v (of V) of this lane: A := J^T A J, V := V J, J
// the product of the round's rotations. Returns whether this lane's pair rotated.
template <class W, class T, int M, int t>
PMRL_HD bool warp_jacobi_round(const W& w, T (&a)[M], T (&v)[M]) {
  using N = Num<T>;
  constexpr int n = M + (M & 1);  // an odd M pairs one index with the absent index M each round
  const int l = w.lane();
  const int other = l < M ? round_robin_partner(l, t, n) : l;
  const bool paired = other < M && other != l;
  const int partner = paired ? other : l;
  const bool first = l < partner;
  // both lanes of a pair compute the rotation from the same three numbers (a_pq from the lower lane: the two
  // copies of a_pq can differ by rounding)
  const T own_diag = pick(a, l < M ? l : 0);
  const T other_diag = w.shfl(own_diag, partner);
  const T apq = w.shfl(pick(a, partner), first ? l : partner);
  const T app = first ? own_diag : other_diag;
  const T aqq = first ? other_diag : own_diag;
  // jacobi_rotate's test and angle (pmrl/eigen.h)
  const T tol = T(kJacobiRelTol) * N::eps();
  const bool rotates = paired && apq * apq > tol * N::abs(app) * (tol * N::abs(aqq));
  T c = T(1), s = T(0), shift = T(0);
  if (rotates) {
    const T theta = (aqq - app) / (T(2) * apq);
    const T at = N::abs(theta);
    T tn = T(1) / (at + (at > T(1) ? at * N::sqrt(T(1) + T(1) / (at * at)) : N::sqrt(T(1) + at * at)));
    if (theta < T(0)) tn = -tn;
    if (tn != T(0)) {
      c = T(1) / N::sqrt(T(1) + tn * tn);
      s = tn * c;
      shift = tn * apq;
    }
  }
  // columns: A J and V J, every pair of the round in every lane
  PMRL_UNROLL
  for (int k = 0; k < n / 2; ++k) {
    const int i0 = round_robin_index(k, t, n), i1 = round_robin_index(n - 1 - k, t, n);
    const int p = i0 < i1 ? i0 : i1, q = i0 < i1 ? i1 : i0;
    if (q >= M) continue;
    const T ck = w.shfl(c, p), sk = w.shfl(s, p);
    const T ap = a[p], aq = a[q], vp = v[p], vq = v[q];
    a[p] = ck * ap - sk * aq;
    a[q] = sk * ap + ck * aq;
    v[p] = ck * vp - sk * vq;
    v[q] = sk * vp + ck * vq;
  }
  // rows: J^T (A J), each lane mixing its row with its partner's: row p c a_p - s a_q, row q c a_q + s a_p
  const T s_row = first ? -s : s;
  PMRL_UNROLL
  for (int j = 0; j < M; ++j) a[j] = c * a[j] + s_row * w.shfl(a[j], partner);
  // the pair's block exactly: a_pq = 0, a_pp - t a_pq, a_qq + t a_pq (as jacobi_rotate)
  if (rotates) {
    put(a, partner, T(0));
    put(a, l, first ? app - shift : aqq + shift);
  }
  return rotates;
}

template <class W, class T, int M, int... ts>
PMRL_HD bool warp_jacobi_sweep(const W& w, T (&a)[M], T (&v)[M], std::integer_sequence<int, ts...>) {
  bool rotated = false;
  ((rotated = warp_jacobi_round<W, T, M, ts>(w, a, v) || rotated), ...);
  return rotated;
}

// Eigen-decomposition of the symmetric matrix whose row l is lane l's a: on return lam (every lane) holds the
// eigenvalues, descending and clamped at 0, and u lane l's row of the eigenvectors (columns), canonical signs; NaN
// in both when an entry is not finite. a is overwritten.
template <class W, class T, int M>
PMRL_HD void warp_eigh_descending(const W& w, T (&a)[M], T (&lam)[M], T (&u)[M]) {
  const int l = w.lane();
  bool finite = true;
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) finite = finite && is_finite(a[k]);
  if (w.ballot(!finite) != 0u) {
    PMRL_UNROLL
    for (int k = 0; k < M; ++k) lam[k] = u[k] = quiet_nan<T>();
    return;
  }
  T v[M];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) v[k] = T(l == k);
  constexpr int rounds = M - 1 + (M & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    const bool rotated = warp_jacobi_sweep<W, T, M>(w, a, v, std::make_integer_sequence<int, rounds>{});
    if (w.ballot(rotated) == 0u) break;
  }
  // descending by rank, exact ties in index order (the stable order of sort_descending_clamped)
  T raw[M];
  warp_gather(w, pick(a, l < M ? l : 0), raw);
  int rank[M];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) {
    rank[k] = 0;
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) rank[k] += raw[j] > raw[k] || (raw[j] == raw[k] && j < k);
  }
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) {
    T value = T(0), column = T(0);
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) {
      value = rank[j] == k ? raw[j] : value;
      column = rank[j] == k ? v[j] : column;
    }
    lam[k] = value > T(0) ? value : T(0);
    u[k] = column;
  }
  // canonical_signs (pmrl/eigen.h): the column sum, or within kSignTol of 0 the first entry above kSignTol
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) {
    const T sum = warp_sum(w, l < M ? u[k] : T(0));
    const unsigned above = w.ballot(l < M && Num<T>::abs(u[k]) > T(kSignTol));
    int lowest = 0;
    while (above != 0u && !((above >> lowest) & 1u)) ++lowest;
    const T first = w.shfl(u[k], lowest);
    const T key = Num<T>::abs(sum) > T(kSignTol) ? sum : (above != 0u ? first : T(0));
    if (key < T(0)) u[k] = -u[k];
  }
}

// gram_spectrum (pmrl/instance.h) on lane l's row g of the Gram matrix of the scaled rows: s (every lane), u (lane
// l's row of U) and lead_coef (every lane). g is overwritten.
template <class W, class T, int M>
PMRL_HD void warp_gram_spectrum(const W& w, T (&g)[M], const T (&r)[M], bool normalize, int64_t dim, T (&s)[M],
                                T (&u)[M], T (&lead_coef)[M]) {
  const int l = w.lane();
  const int row = l < M ? l : 0;
  const T diag = pick(g, row);
  const T own_w = normalize ? inverse_norm(diag, pick(r, row)) : T(1);
  const T c = scale_for(warp_max(w, l < M ? Num<T>::sqrt(diag) * own_w : T(0)));
  const T own_wc = cap_finite(own_w * c);
  T wv[M];
  warp_gather(w, own_wc, wv);
  PMRL_UNROLL
  for (int n = 0; n < M; ++n) g[n] = l < M ? (g[n] * own_wc) * wv[n] : T(0);
  T lam[M];
  warp_eigh_descending<W, T, M>(w, g, lam, u);
  const T undo = normalize ? T(1) : r[0];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) s[k] = k < dim ? Num<T>::sqrt(lam[k]) / c / undo : T(0) * lam[k];
  const T inv_s1 = safe_inverse(Num<T>::sqrt(lam[0]), Num<T>::tiny());
  warp_gather(w, u[0] * own_wc * inv_s1, lead_coef);
}

// backward_coefficients (pmrl/instance.h) with U spread over the lanes: u is lane l's row of U, the other inputs
// are in every lane. Writes lane l's row a of the coefficients, and e and out_scale (and r without normalize) in
// every lane, such that dL/dz_m = r_m (out_scale[m] (sum_n a_m[n] (r_n z_n) + e[m] gbar)).
template <class W, class T, int M>
PMRL_HD void warp_backward_coefficients(const W& w, const T (&s_in)[M], const T (&u)[M], const T* grad_s,
                                        bool has_grad_lead, const T (&sq)[M], const T (&zg)[M], bool normalize,
                                        T (&r)[M], T (&a)[M], T (&e)[M], T (&out_scale)[M]) {
  const int l = w.lane();
  const int row = l < M ? l : 0;
  const T tiny = Num<T>::tiny();
  const T c = scale_for(s_in[0]);
  T lam[M];
  PMRL_UNROLL
  for (int k = 0; k < M; ++k) lam[k] = (s_in[k] * c) * (s_in[k] * c);
  const T s1 = s_in[0] * c;
  const T inv_s1 = safe_inverse(s1, tiny);
  T zng[M];
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    out_scale[m] = normalize ? cap_finite(inverse_norm(sq[m], r[m]) * c) : T(1);
    zng[m] = has_grad_lead ? zg[m] * (normalize ? out_scale[m] : c) : T(0);
  }
  // K = diag(kd) + h in its first row and column (backward_coefficients' k)
  T kd[M], h[M];
  const T floor_sq = T(kSigmaEps) * s1 * T(kSigmaEps) * s1 + tiny;
  const T gap_floor_sq = T(kGapEps) * lam[0] * T(kGapEps) * lam[0] + tiny;
  const T own_zng = pick(zng, row);
  T lg = T(0);
  PMRL_UNROLL
  for (int j = 0; j < M; ++j) {
    kd[j] = grad_s != nullptr ? grad_s[j] / c * safe_inverse(s_in[j] * c, floor_sq) : T(0);
    const T b = has_grad_lead ? warp_sum(w, l < M ? u[j] * own_zng : T(0)) : T(0);
    h[j] = j > 0 && has_grad_lead ? b * safe_inverse(lam[0] - lam[j], gap_floor_sq) * inv_s1 : T(0);
    if (j == 0) lg = b * inv_s1;
  }
  if (has_grad_lead) kd[0] -= lg * inv_s1 * inv_s1;
  T uk[M];  // lane l's row of U K
  uk[0] = u[0] * kd[0];
  PMRL_UNROLL
  for (int j = 1; j < M; ++j) {
    uk[0] += u[j] * h[j];
    uk[j] = u[0] * h[j] + u[j] * kd[j];
  }
  PMRL_UNROLL
  for (int n = 0; n < M; ++n) {
    T cmn = T(0);
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) cmn += uk[j] * w.shfl(u[j], n);
    a[n] = cmn * out_scale[n];
  }
  T v[M];
  warp_gather(w, has_grad_lead ? u[0] * inv_s1 : T(0), v);
  if (normalize && l < M && !(Num<T>::sqrt(pick(sq, row)) <= pick(r, row) * T(kNormEps))) {
    T radial = pick(v, row) * own_zng;
    PMRL_UNROLL
    for (int j = 0; j < M; ++j) radial += uk[j] * lam[j] * u[j];
    put(a, row, pick(a, row) - radial * pick(out_scale, row) / (c * c));
  }
  PMRL_UNROLL
  for (int m = 0; m < M; ++m) {
    e[m] = v[m];
    if (!normalize) r[m] = c;
  }
}

}  // namespace pmrl
