// Self-checks of the header-only per-instance maths (pmrl/eigen.h, pmrl/instance.h), built and run by ctest
// (CMakeLists.txt): known spectra, rank 1, ties, non-finite input, and the backward coefficients against central
// finite differences in double. Exits non-zero on the first failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "pmrl/instance.h"
#include "pmrl/launch.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, double value = 0.0) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s (%g)\n", what, value);
    ++failures;
  }
}

std::mt19937_64 rng(12345);

double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }

// max |G u_k - lam_k u_k|, max |U^T U - I|, descending order, and the sign rule, for the decomposition of g.
template <class T, int M>
void check_decomposition(const T (&g)[M][M], T tol, const char* what) {
  T a[M][M], lam[M], u[M][M];
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < M; ++c) a[r][c] = g[r][c];
  pmrl::eigh_descending<T, M>(a, lam, u);
  T scale = 0;
  for (int r = 0; r < M; ++r) scale = std::fmax(scale, std::fabs(g[r][r]));
  double residual = 0, orth = 0, sign = 0;
  for (int k = 0; k < M; ++k) {
    T sum = 0;
    for (int r = 0; r < M; ++r) {
      T gu = 0;
      for (int c = 0; c < M; ++c) gu += g[r][c] * u[c][k];
      // lam is clamped at 0: a slightly negative eigenvalue of g leaves a residual of its size
      residual = std::fmax(residual, std::fabs(gu - lam[k] * u[r][k]));
      sum += u[r][k];
    }
    if (sum < 0) sign = 1;
    if (k + 1 < M && lam[k] < lam[k + 1]) sign = 1;
    if (lam[k] < 0) sign = 1;
    for (int l = 0; l < M; ++l) {
      T dot = 0;
      for (int r = 0; r < M; ++r) dot += u[r][k] * u[r][l];
      orth = std::fmax(orth, std::fabs(dot - T(k == l)));
    }
  }
  check(residual <= tol * (scale + 1), what, residual);
  check(orth <= tol, what, orth);
  check(sign == 0, what);
}

// A random Gram matrix X X^T (positive semi-definite, as every G is), X of M x (M + 1).
template <int M>
void random_gram() {
  double x[M][M + 1], g[M][M];
  float gf[M][M];
  for (auto& row : x)
    for (double& v : row) v = normal();
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < M; ++c) {
      g[r][c] = 0;
      for (int d = 0; d <= M; ++d) g[r][c] += x[r][d] * x[c][d];
      gf[r][c] = static_cast<float>(g[r][c]);
    }
  check_decomposition<double, M>(g, 1e-12, "random Gram matrix, double");
  check_decomposition<float, M>(gf, 2e-5f, "random Gram matrix, float");
}

template <int... Ms>
void random_gram_all(std::integer_sequence<int, Ms...>) {
  (random_gram<Ms + pmrl::kMinM>(), ...);
}

void known_spectra() {
  {  // eigenvalues 3 and 1 of [[2, 1], [1, 2]] with an unambiguous first column
    double g[2][2] = {{2, 1}, {1, 2}}, lam[2], u[2][2];
    pmrl::eigh_descending<double, 2>(g, lam, u);
    check(std::fabs(lam[0] - 3) < 1e-14 && std::fabs(lam[1] - 1) < 1e-14, "2x2 eigenvalues");
    check(std::fabs(u[0][0] - std::sqrt(0.5)) < 1e-14 && std::fabs(u[1][0] - std::sqrt(0.5)) < 1e-14, "2x2 u1");
  }
  {  // already diagonal, unsorted: a permutation, sorted descending
    double g[3][3] = {{1, 0, 0}, {0, 5, 0}, {0, 0, 3}}, lam[3], u[3][3];
    pmrl::eigh_descending<double, 3>(g, lam, u);
    check(lam[0] == 5 && lam[1] == 3 && lam[2] == 1, "diagonal eigenvalues sorted");
    check(u[1][0] == 1 && u[2][1] == 1 && u[0][2] == 1, "diagonal eigenvectors permuted");
  }
  {  // rank 1: G = x x^T, lam = (|x|^2, 0, ...), u1 = x / |x| signed to sum >= 0
    constexpr int M = 5;
    double x[M], g[M][M], lam[M], u[M][M], norm2 = 0;
    for (int m = 0; m < M; ++m) {
      x[m] = normal() - 0.3;
      norm2 += x[m] * x[m];
    }
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < M; ++c) g[r][c] = x[r] * x[c];
    check_decomposition<double, M>(g, 1e-13, "rank 1");
    pmrl::eigh_descending<double, M>(g, lam, u);
    double sum = 0;
    for (int m = 0; m < M; ++m) sum += x[m];
    const double sign = sum >= 0 ? 1.0 : -1.0;
    check(std::fabs(lam[0] - norm2) < 1e-12 * norm2, "rank 1 lam1");
    for (int k = 1; k < M; ++k) check(lam[k] >= 0 && lam[k] < 1e-13 * norm2, "rank 1 lam_k", lam[k]);
    for (int m = 0; m < M; ++m) check(std::fabs(u[m][0] - sign * x[m] / std::sqrt(norm2)) < 1e-12, "rank 1 u1");
  }
  {  // ties: the identity, and a double eigenvalue under a random rotation
    double id[16][16] = {};
    for (int m = 0; m < 16; ++m) id[m][m] = 1;
    check_decomposition<double, 16>(id, 1e-15, "identity");
    constexpr int M = 4;
    double q[M][M], g[M][M] = {}, d[M] = {3, 1, 1, 0.5};
    for (int r = 0; r < M; ++r)  // Gram-Schmidt of a random matrix
      for (int c = 0; c < M; ++c) q[r][c] = normal();
    for (int c = 0; c < M; ++c) {
      for (int p = 0; p < c; ++p) {
        double dot = 0;
        for (int r = 0; r < M; ++r) dot += q[r][c] * q[r][p];
        for (int r = 0; r < M; ++r) q[r][c] -= dot * q[r][p];
      }
      double n = 0;
      for (int r = 0; r < M; ++r) n += q[r][c] * q[r][c];
      for (int r = 0; r < M; ++r) q[r][c] /= std::sqrt(n);
    }
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < M; ++c)
        for (int k = 0; k < M; ++k) g[r][c] += q[r][k] * d[k] * q[c][k];
    check_decomposition<double, M>(g, 1e-13, "double eigenvalue");
  }
}

void non_finite_terminates() {
  const double bad[] = {NAN, INFINITY, -INFINITY};
  for (double x : bad) {
    double g[3][3] = {{1, 0.5, 0}, {0.5, 2, x}, {0, x, 1}}, lam[3], u[3][3];
    pmrl::eigh_descending<double, 3>(g, lam, u);
    bool all_nan = true;
    for (int r = 0; r < 3; ++r) {
      all_nan = all_nan && std::isnan(lam[r]);
      for (int c = 0; c < 3; ++c) all_nan = all_nan && std::isnan(u[r][c]);
    }
    check(all_nan, "non-finite input gives NaN everywhere");
  }
  // extreme but finite dynamic range: terminates with a valid decomposition
  float g[2][2] = {{1e30f, 1e-30f}, {1e-30f, 1e-30f}};
  check_decomposition<float, 2>(g, 1e-6f, "extreme dynamic range");
}

// One instance end to end, with plain loops over D: S, lead and dL/dz for L = gs . S + gl . lead. The rows reach
// the maths scaled by r (powers of two: per row with normalize, one for all without), as the kernels hand them
// over after a rescale; all 1 is the kernels' usual path.
template <int M>
struct Instance {
  int dim;
  bool normalize;
  std::vector<double> z;  // [M][dim]
  std::vector<double> r = std::vector<double>(M, 1.0);

  void forward(const std::vector<double>& zz, pmrl::Spectrum<double, M>& sp, std::vector<double>& lead) const {
    double g[M][M], rs[M];
    for (int m = 0; m < M; ++m) {
      rs[m] = r[m];
      for (int k = 0; k < M; ++k) {
        g[m][k] = 0;
        for (int d = 0; d < dim; ++d) g[m][k] += r[m] * zz[m * dim + d] * (r[k] * zz[k * dim + d]);
      }
    }
    pmrl::gram_spectrum<double, M>(g, rs, normalize, dim, sp);
    lead.assign(dim, 0.0);
    for (int m = 0; m < M; ++m)
      for (int d = 0; d < dim; ++d) lead[d] += sp.lead_coef[m] * (r[m] * zz[m * dim + d]);
  }

  double loss(const std::vector<double>& zz, const double (&gs)[M], const std::vector<double>& gl) const {
    pmrl::Spectrum<double, M> sp;
    std::vector<double> lead;
    forward(zz, sp, lead);
    double l = 0;
    for (int k = 0; k < M; ++k) l += gs[k] * sp.s[k];
    for (int d = 0; d < dim; ++d) l += gl[d] * lead[d];
    return l;
  }

  // (S, lead, dL/dz) of one evaluation.
  std::vector<double> backward(const double (&gs)[M], const std::vector<double>& gl,
                               std::vector<double>* s_lead = nullptr) const {
    pmrl::Spectrum<double, M> sp;
    std::vector<double> lead;
    forward(z, sp, lead);
    // without normalize the backward takes the raw rows and scales them itself
    double rb[M];
    for (int m = 0; m < M; ++m) rb[m] = normalize ? r[m] : 1.0;
    double sq[M] = {}, zg[M] = {}, a[M][M], e[M], out[M];
    for (int m = 0; m < M; ++m)
      for (int d = 0; d < dim; ++d) {
        sq[m] += rb[m] * z[m * dim + d] * (rb[m] * z[m * dim + d]);
        zg[m] += rb[m] * z[m * dim + d] * gl[d];
      }
    pmrl::backward_coefficients<double, M>(sp.s, sp.u, gs, true, sq, zg, normalize, rb, a, e, out);
    std::vector<double> dz(M * dim, 0.0);
    for (int m = 0; m < M; ++m)
      for (int d = 0; d < dim; ++d) {
        double acc = e[m] * gl[d];
        for (int n = 0; n < M; ++n) acc += a[m][n] * (rb[n] * z[n * dim + d]);
        dz[m * dim + d] = rb[m] * (out[m] * acc);
      }
    if (s_lead != nullptr) {
      s_lead->assign(sp.s, sp.s + M);
      s_lead->insert(s_lead->end(), lead.begin(), lead.end());
    }
    return dz;
  }
};

// Scaling the rows by powers of two (per row with normalize, one for all without) changes nothing but rounding.
template <int M>
void row_scales_are_invisible(int dim, bool normalize) {
  Instance<M> plain{dim, normalize, std::vector<double>(M * dim)};
  for (double& x : plain.z) x = normal();
  Instance<M> scaled = plain;
  for (int m = 0; m < M; ++m) scaled.r[m] = normalize ? std::ldexp(1.0, 40 - 20 * m) : std::ldexp(1.0, -300);
  double gs[M];
  for (double& x : gs) x = normal();
  std::vector<double> gl(dim);
  for (double& x : gl) x = normal();
  std::vector<double> out_plain, out_scaled;
  const std::vector<double> dz_plain = plain.backward(gs, gl, &out_plain);
  const std::vector<double> dz_scaled = scaled.backward(gs, gl, &out_scaled);
  double worst = 0, top = 0;
  for (size_t j = 0; j < out_plain.size(); ++j) worst = std::fmax(worst, std::fabs(out_plain[j] - out_scaled[j]));
  for (size_t j = 0; j < dz_plain.size(); ++j) {
    worst = std::fmax(worst, std::fabs(dz_plain[j] - dz_scaled[j]));
    top = std::fmax(top, std::fabs(dz_plain[j]));
  }
  check(worst <= 1e-10 * (1 + top), normalize ? "row scales (normalize)" : "common scale (raw rows)", worst);
}

template <int M>
void backward_matches_finite_differences(int dim, bool normalize) {
  // Rows around a common direction: the sign of u_1 is far from its switching point (sum u_1 = 0), which a
  // finite difference must not cross.
  Instance<M> inst{dim, normalize, std::vector<double>(M * dim)};
  std::vector<double> base(dim);
  for (double& x : base) x = normal();
  for (int j = 0; j < M * dim; ++j) inst.z[j] = base[j % dim] + normal();
  double gs[M];
  for (double& x : gs) x = normal();
  std::vector<double> gl(dim);
  for (double& x : gl) x = normal();
  const std::vector<double> dz = inst.backward(gs, gl);
  double worst = 0, scale = 0;
  for (int j = 0; j < M * dim; ++j) {
    const double h = 1e-6;
    std::vector<double> zp = inst.z, zm = inst.z;
    zp[j] += h;
    zm[j] -= h;
    const double fd = (inst.loss(zp, gs, gl) - inst.loss(zm, gs, gl)) / (2 * h);
    worst = std::fmax(worst, std::fabs(fd - dz[j]));
    scale = std::fmax(scale, std::fabs(fd));
  }
  // The floors of the singular cases move the result by (SIGMA_EPS sigma_1 / sigma_k)^2 relative: ~1e-5 here.
  check(worst <= 1e-4 * (1 + scale), normalize ? "backward vs finite differences (normalize)"
                                                : "backward vs finite differences (raw rows)", worst);
}

// A zero row under normalisation: every output finite, that row's gradient exactly 0 (as F.normalize's would
// be: its normalised row is 0 whatever the direction).
void zero_row_backward() {
  constexpr int M = 3;
  Instance<M> inst{6, true, std::vector<double>(M * 6)};
  for (int j = 6; j < M * 6; ++j) inst.z[j] = normal();
  const double gs[M] = {0.3, -1.0, 2.0};
  std::vector<double> gl(6);
  for (double& x : gl) x = normal();
  const std::vector<double> dz = inst.backward(gs, gl);
  bool finite = true, zero = true;
  for (int j = 0; j < M * 6; ++j) finite = finite && std::isfinite(dz[j]);
  for (int d = 0; d < 6; ++d) zero = zero && dz[d] == 0.0;
  check(finite, "zero row: finite gradient");
  check(zero, "zero row: zero gradient on the zero row");
}

// Subnormal rows beside a zero row, as a kernel hands them over: the raw Gram matrix underflows, so the rows are
// rescaled (row_scales); every nonzero row is below NORM_EPS, so Zn = Z / NORM_EPS and the instance scale c is
// large enough that c / NORM_EPS overflows for the zero row. S, lead and dL/dz for L = gs . S must be those of the
// same rows scaled exactly by 2^-exp into the normal range, in double and without normalisation (where
// S = S' 2^exp / NORM_EPS), and the zero row must keep exactly zero coefficients and gradient.
template <class T, int M>
void subnormal_rows_beside_a_zero_row(int dim, int exp, double tol) {
  std::vector<T> z(M * dim, T(0));  // row 0 stays zero
  std::vector<double> zd(M * dim, 0.0);
  for (int j = dim; j < M * dim; ++j) {
    z[j] = static_cast<T>(std::ldexp(normal(), exp));
    zd[j] = std::ldexp(static_cast<double>(z[j]), -exp);
  }
  T diag[M] = {}, amax[M] = {}, r[M], g[M][M];
  for (int m = 0; m < M; ++m)
    for (int d = 0; d < dim; ++d) {
      diag[m] += z[m * dim + d] * z[m * dim + d];
      amax[m] = std::fmax(amax[m], std::fabs(z[m * dim + d]));
    }
  check(pmrl::gram_needs_rescale<T, M>(diag, true), "subnormal rows: the raw Gram matrix asks for a rescale");
  pmrl::row_scales<T, M>(amax, true, r);
  std::vector<T> zhat(M * dim);
  for (int j = 0; j < M * dim; ++j) zhat[j] = r[j / dim] * z[j];
  T sq[M], zg[M] = {};
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < M; ++n) {
      g[m][n] = 0;
      for (int d = 0; d < dim; ++d) g[m][n] += zhat[m * dim + d] * zhat[n * dim + d];
    }
  for (int m = 0; m < M; ++m) sq[m] = g[m][m];
  pmrl::Spectrum<T, M> sp;
  pmrl::gram_spectrum<T, M>(g, r, true, dim, sp);
  std::vector<double> lead(dim, 0.0);
  for (int m = 0; m < M; ++m)
    for (int d = 0; d < dim; ++d) lead[d] += sp.lead_coef[m] * zhat[m * dim + d];
  T gs[M];
  for (T& x : gs) x = static_cast<T>(normal());
  T a[M][M], e[M], out[M];
  pmrl::backward_coefficients<T, M>(sp.s, sp.u, gs, true, sq, zg, true, r, a, e, out);
  std::vector<double> dz(M * dim);
  for (int m = 0; m < M; ++m)
    for (int d = 0; d < dim; ++d) {
      T acc = 0;
      for (int n = 0; n < M; ++n) acc += a[m][n] * zhat[n * dim + d];
      dz[m * dim + d] = r[m] * (out[m] * acc);
    }

  Instance<M> exact{dim, false, zd};
  const double k = std::ldexp(1.0, exp) / pmrl::kNormEps;  // S = k S'
  double gs_exact[M];
  for (int m = 0; m < M; ++m) gs_exact[m] = k * gs[m];
  std::vector<double> s_lead;
  const std::vector<double> dz_exact = exact.backward(gs_exact, std::vector<double>(dim, 0.0), &s_lead);
  bool finite = sp.lead_coef[0] == T(0), zero = true;
  double s_err = 0, lead_err = 0, dz_err = 0, dz_top = 0;
  for (int m = 0; m < M; ++m) {
    finite = finite && std::isfinite(sp.s[m]) && std::isfinite(sp.lead_coef[m]) && std::isfinite(out[m]);
    s_err = std::fmax(s_err, std::fabs(sp.s[m] - k * s_lead[m]) / (k * s_lead[0]));
  }
  for (int d = 0; d < dim; ++d) lead_err = std::fmax(lead_err, std::fabs(lead[d] - s_lead[M + d]));
  for (int j = 0; j < M * dim; ++j) {
    finite = finite && std::isfinite(dz[j]);
    zero = zero && (j >= dim || dz[j] == 0.0);
    const double expected = std::ldexp(dz_exact[j], -exp);
    dz_err = std::fmax(dz_err, std::fabs(dz[j] - expected));
    dz_top = std::fmax(dz_top, std::fabs(expected));
  }
  check(finite, "subnormal rows beside a zero row: finite S, lead and coefficients, zero row out of lead");
  check(zero, "subnormal rows beside a zero row: exactly zero gradient on the zero row");
  check(s_err <= tol, "subnormal rows beside a zero row: S", s_err);
  check(lead_err <= tol, "subnormal rows beside a zero row: lead", lead_err);
  check(dz_err <= tol * dz_top, "subnormal rows beside a zero row: dL/dz", dz_err / dz_top);
}

// Without normalisation, rows so small that the instance scale c stops at its clamp (2^1022 in double) leave
// sigma_1c below 1 and lead's coefficients large: c times them overflows unless the pass over D scales the rows
// first. With D = 1, lead is constant (+-1): its true gradient is 0, and here the two terms that cancel are each
// within range, so dL/dz must be finite; and S_1 = ||z|| is homogeneous of degree 1, so the gradient of gs . S
// equals that of the same rows scaled by 2^1030 into the normal range.
template <int M>
void raw_rows_below_the_scale_clamp() {
  Instance<M> tiny{1, false, std::vector<double>(M)}, plain = tiny;
  for (int m = 1; m < M; ++m) {  // row 0 stays zero
    tiny.z[m] = std::ldexp(normal(), -1030);
    plain.z[m] = std::ldexp(tiny.z[m], 1030);
  }
  double amax[M];
  for (int m = 0; m < M; ++m) amax[m] = std::fabs(tiny.z[m]);
  pmrl::row_scales<double, M>(amax, false, tiny.r.data());  // the forward's rescale, as a kernel takes it
  double gs[M];
  for (double& x : gs) x = normal();
  const std::vector<double> dz = tiny.backward(gs, {0.0}), expected = plain.backward(gs, {0.0});
  const std::vector<double> with_lead = tiny.backward(gs, {normal()});
  double worst = 0, top = 0;
  bool finite = true;
  for (int m = 0; m < M; ++m) {
    finite = finite && std::isfinite(with_lead[m]);
    worst = std::fmax(worst, std::fabs(dz[m] - expected[m]));
    top = std::fmax(top, std::fabs(expected[m]));
  }
  check(finite, "raw rows below the scale clamp: finite gradient through lead");
  check(worst <= 1e-9 * top, "raw rows below the scale clamp: dL/dz of gs . S", worst / top);
}

// G = I (orthonormal rows): the top eigenvalue is tied, the lead terms stay finite (safe_inverse of a 0 gap).
void tie_backward_finite() {
  constexpr int M = 4;
  Instance<M> inst{5, true, std::vector<double>(M * 5, 0.0)};
  for (int m = 0; m < M; ++m) inst.z[m * 5 + m] = 2.0;
  const double gs[M] = {1, 1, 1, 1};
  const std::vector<double> gl = {0.5, -1, 2, 0.25, 3};
  const std::vector<double> dz = inst.backward(gs, gl);
  bool finite = true;
  for (double x : dz) finite = finite && std::isfinite(x);
  check(finite, "tie: finite gradient");
}

}  // namespace

// The CUDA launch's lanes per instance: enough to cover D in one step, at most the cap; a bad cap counts as 32.
void lanes_cover_d_up_to_the_cap() {
  check(pmrl::lanes_per_instance(512, 4, 32) == 32, "D = 512, vec 4: 32 lanes");
  check(pmrl::lanes_per_instance(512, 4, 8) == 8, "D = 512, cap 8: 8 lanes");
  check(pmrl::lanes_per_instance(33, 1, 32) == 32, "D = 33, vec 1: 32 lanes");
  check(pmrl::lanes_per_instance(32, 1, 32) == 32, "D = 32, vec 1: 32 lanes");
  check(pmrl::lanes_per_instance(16, 4, 32) == 4, "D = 16, vec 4: 4 lanes");
  check(pmrl::lanes_per_instance(1, 1, 4) == 1, "D = 1: 1 lane");
  for (int bad : {0, -8, 3, 12, 64}) check(pmrl::lanes_per_instance(4096, 4, bad) == 32, "bad cap: 32 lanes", bad);
}

int main() {
  known_spectra();
  lanes_cover_d_up_to_the_cap();
  for (int trial = 0; trial < 20; ++trial)
    random_gram_all(std::make_integer_sequence<int, pmrl::kMaxM - pmrl::kMinM + 1>{});
  non_finite_terminates();
  for (bool normalize : {true, false}) {
    backward_matches_finite_differences<2>(3, normalize);
    backward_matches_finite_differences<3>(7, normalize);
    backward_matches_finite_differences<5>(9, normalize);
    backward_matches_finite_differences<8>(12, normalize);
  }
  for (bool normalize : {true, false}) {
    row_scales_are_invisible<3>(7, normalize);
    row_scales_are_invisible<6>(11, normalize);
  }
  zero_row_backward();
  // float: rows of ~1e-42 (subnormal); double: ~1e-313
  subnormal_rows_beside_a_zero_row<float, 3>(8, -140, 1e-4);
  subnormal_rows_beside_a_zero_row<float, 5>(3, -135, 1e-4);
  subnormal_rows_beside_a_zero_row<double, 3>(8, -1040, 1e-9);
  subnormal_rows_beside_a_zero_row<double, 4>(2, -1030, 1e-9);
  raw_rows_below_the_scale_clamp<2>();
  raw_rows_below_the_scale_clamp<4>();
  tie_backward_finite();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("header maths: all checks passed\n");
  return EXIT_SUCCESS;
}
