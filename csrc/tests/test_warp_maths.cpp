// Self-checks of the warp-spread maths (pmrl/warp_instance.h) on the host: each lane of a warp runs as a fiber
// (ucontext), and every exchange (shfl, shfl_xor, ballot) waits until all lanes reached it, as a warp's lanes do on
// a GPU. The results are compared with the one-lane maths of pmrl/instance.h, which test_header_maths checks
// against known spectra and finite differences. Exits non-zero on the first failure.
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "pmrl/warp_instance.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, int m, double value = 0.0) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s, M = %d (%g)\n", what, m, value);
    ++failures;
  }
}

// A warp of N lanes, each a fiber; run(body) calls body(warp) on every lane and returns when all lanes returned.
// An exchange stores the lane's value, switches to the scheduler, and reads the others' values once every lane
// has stored its own; two slot generations keep a lane that runs ahead from overwriting a value still to be read.
// Lanes that reach different exchanges (another count or another kind) abort the run: a warp would hang or mix.
template <int N>
class EmulatedWarp {
 public:
  static constexpr int kSize = N;

  int lane() const { return current_; }

  template <class T>
  T shfl(T x, int src) const {
    return T(exchange(double(x), 0)[src]);
  }
  template <class T>
  T shfl_xor(T x, int mask) const {
    return T(exchange(double(x), 1)[current_ ^ mask]);
  }
  unsigned ballot(bool p) const {
    const double* slot = exchange(p ? 1.0 : 0.0, 2);
    unsigned bits = 0;
    for (int l = 0; l < N; ++l) bits |= slot[l] != 0.0 ? 1u << l : 0u;
    return bits;
  }

  void run(const std::function<void(const EmulatedWarp&)>& body) {
    body_ = &body;
    for (int l = 0; l < N; ++l) {
      getcontext(&lanes_[l]);
      lanes_[l].uc_stack.ss_sp = stacks_[l].data();
      lanes_[l].uc_stack.ss_size = stacks_[l].size();
      lanes_[l].uc_link = &scheduler_;
      makecontext(&lanes_[l], reinterpret_cast<void (*)()>(&EmulatedWarp::entry), 0);
      done_[l] = false;
      generation_[l] = 0;
    }
    active_ = this;
    for (bool running = true; running;) {
      running = false;
      for (int l = 0; l < N; ++l) {
        if (done_[l]) continue;
        current_ = l;
        swapcontext(&scheduler_, &lanes_[l]);
        running = running || !done_[l];
      }
      for (int l = 1; l < N; ++l) {
        if (done_[l] != done_[0] || generation_[l] != generation_[0] || kinds_[l] != kinds_[0]) {
          std::fprintf(stderr, "lanes diverged: an exchange was not reached by every lane\n");
          std::abort();
        }
      }
    }
  }

 private:
  static void entry() {
    EmulatedWarp* warp = active_;
    (*warp->body_)(*warp);
    warp->done_[warp->current_] = true;
  }

  const double* exchange(double x, int kind) const {
    auto* self = const_cast<EmulatedWarp*>(this);
    const int l = current_;
    const int g = self->generation_[l]++ & 1;
    self->slots_[g][l] = x;
    self->kinds_[l] = kind;
    swapcontext(&self->lanes_[l], &self->scheduler_);
    self->current_ = l;
    return slots_[g];
  }

  static inline EmulatedWarp* active_ = nullptr;
  const std::function<void(const EmulatedWarp&)>* body_ = nullptr;
  ucontext_t scheduler_{}, lanes_[N]{};
  std::vector<std::vector<char>> stacks_ = std::vector<std::vector<char>>(N, std::vector<char>(1 << 18));
  double slots_[2][N]{};
  long generation_[N]{};
  int kinds_[N]{};
  bool done_[N]{};
  mutable int current_ = 0;
};

// The smallest warp that leaves lanes past M (every exchange is a meeting of all its fibers): 16 lanes below
// M = 16, the hardware's 32 at M = 16.
constexpr int warp_size(int m) { return m < 16 ? 16 : 32; }

std::mt19937_64 rng(2024);
double normal() { return std::normal_distribution<double>(0.0, 1.0)(rng); }

// The rows of one instance, [M][dim], and the kinds of input the checks draw.
// kFaintRow: one row of norm below NORM_EPS, where the normalisation's backward skips its projection.
enum class Kind { kRandom, kRankOne, kDuplicated, kZeroRow, kFaintRow, kNearTie, kHuge, kTiny };

// kHuge and kTiny rows are scaled so that their squares over- or underflow T.
template <class T, int M>
std::vector<double> draw(Kind kind, int dim) {
  std::vector<double> z(M * dim);
  for (double& x : z) x = normal();
  const double big = sizeof(T) == 4 ? 1e30 : 1e200;
  const double scale = kind == Kind::kHuge ? big : kind == Kind::kTiny ? 1 / big : 1.0;
  for (int m = 0; m < M; ++m) {
    for (int d = 0; d < dim; ++d) {
      double& x = z[m * dim + d];
      if (kind == Kind::kRankOne) x = z[d] * (1.0 + 0.5 * m);
      if (kind == Kind::kDuplicated && m % 2 == 1) x = z[(m - 1) * dim + d];
      if (kind == Kind::kZeroRow && m == M / 2) x = 0.0;
      if (kind == Kind::kFaintRow && m == M / 2) x *= 1e-14;
      if (kind == Kind::kNearTie && m > 0) x = z[d] + 1e-3 * x;
      x *= scale;
    }
  }
  return z;
}

// Gram matrix of the rows (the reductions the kernels do before the maths), in T.
template <class T, int M>
void gram(const std::vector<double>& z, int dim, T (&g)[M][M]) {
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < M; ++n) {
      T acc = T(0);
      for (int d = 0; d < dim; ++d) acc += T(z[m * dim + d]) * T(z[n * dim + d]);
      g[m][n] = acc;
    }
}

// gram_spectrum of g on one lane (g is copied: the solve overwrites it).
template <class T, int M>
pmrl::Spectrum<T, M> one_lane_spectrum(const T (&g)[M][M], const T (&r)[M], bool normalize, int dim) {
  T a[M][M];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < M; ++n) a[m][n] = g[m][n];
  pmrl::Spectrum<T, M> one;
  pmrl::gram_spectrum<T, M>(a, r, normalize, dim, one);
  return one;
}

// warp_gram_spectrum on the emulated warp, lane l < M given row l of g: every lane's S, row of U and lead
// coefficients.
template <class T, int M>
struct WarpSpectrum {
  static constexpr int N = warp_size(M);
  T s[N][M], u[N][M], coef[N][M];
};

template <class T, int M>
WarpSpectrum<T, M> warp_spectrum(const T (&g)[M][M], const T (&r)[M], bool normalize, int dim) {
  constexpr int N = warp_size(M);
  WarpSpectrum<T, M> out;
  EmulatedWarp<N> warp;
  warp.run([&](const EmulatedWarp<N>& w) {
    const int l = w.lane();
    T row[M];
    for (int n = 0; n < M; ++n) row[n] = l < M ? g[l][n] : T(0);
    pmrl::warp_gram_spectrum<EmulatedWarp<N>, T, M>(w, row, r, normalize, dim, out.s[l], out.u[l], out.coef[l]);
  });
  return out;
}

// warp_gram_spectrum against gram_spectrum: S and lead coefficients always; U where the eigenvalues are apart
// (exactly repeated ones may come out with another basis); the warp's U is orthonormal and diagonalises G.
template <class T, int M>
void spectrum_matches(Kind kind, int dim, bool normalize, T tol) {
  const std::vector<double> z = draw<T, M>(kind, dim);
  T g[M][M], r[M];
  gram<T, M>(z, dim, g);
  for (int m = 0; m < M; ++m) r[m] = T(1);
  T diag[M];
  for (int m = 0; m < M; ++m) diag[m] = g[m][m];
  if (pmrl::gram_needs_rescale<T, M>(diag, normalize)) {
    T amax[M];
    for (int m = 0; m < M; ++m) {
      amax[m] = T(0);
      for (int d = 0; d < dim; ++d) amax[m] = std::fmax(amax[m], std::fabs(T(z[m * dim + d])));
    }
    pmrl::row_scales<T, M>(amax, normalize, r);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < M; ++n) {
        T acc = T(0);
        for (int d = 0; d < dim; ++d) acc += (r[m] * T(z[m * dim + d])) * (r[n] * T(z[n * dim + d]));
        g[m][n] = acc;
      }
  }
  const pmrl::Spectrum<T, M> one = one_lane_spectrum<T, M>(g, r, normalize, dim);
  constexpr int N = warp_size(M);
  const WarpSpectrum<T, M> warp = warp_spectrum<T, M>(g, r, normalize, dim);
  const auto& s = warp.s;
  const auto& u = warp.u;
  const auto& coef = warp.coef;
  double top = 0;
  for (int k = 0; k < M; ++k) top = std::fmax(top, std::fabs(double(one.s[k])));
  // u_1 (and so lead) moves by about eps / (relative gap below sigma_1^2) between two correct solves
  const double second = M > 1 ? double(one.s[1]) / top : 0.0;
  const double gap = std::fmax(1.0 - second * second, double(tol));
  bool apart = true;
  for (int k = 0; k + 1 < M; ++k) apart = apart && one.s[k] - one.s[k + 1] > 1e-2 * top;
  for (int l = 0; l < N; ++l) {
    for (int k = 0; k < M; ++k) {
      // from the Gram matrix, an eigenvalue sigma^2 carries an error of order eps sigma_1^2 (docs/numerics.md)
      const double mine = double(s[l][k]) / top, theirs = double(one.s[k]) / top;
      check(std::fabs(mine * mine - theirs * theirs) <= double(tol), "S^2", M, mine * mine - theirs * theirs);
      const double coef_scale = std::fabs(double(one.lead_coef[k])) + 1.0 / (top + 1e-300);
      check(std::fabs(double(coef[l][k] - one.lead_coef[k])) <= 10 * double(tol) * coef_scale / gap,
            "lead coefficient", M, double(coef[l][k] - one.lead_coef[k]));
    }
  }
  // U: orthonormal, canonical signs, and equal to the one-lane U where the spectrum is simple
  for (int k = 0; k < M; ++k) {
    double sum = 0;
    for (int j = 0; j < M; ++j) {
      double dot = 0;
      for (int m = 0; m < M; ++m) dot += double(u[m][k]) * double(u[m][j]);
      check(std::fabs(dot - (k == j)) <= 10 * double(tol), "U orthonormal", M, dot);
    }
    double first = 0;
    for (int m = 0; m < M; ++m) {
      sum += double(u[m][k]);
      if (first == 0 && std::fabs(double(u[m][k])) > pmrl::kSignTol) first = double(u[m][k]);
      if (apart) check(std::fabs(double(u[m][k] - one.u[m][k])) <= 100 * double(tol), "U", M,
                       double(u[m][k] - one.u[m][k]));
    }
    // canonical_signs: the column sum decides, or within kSignTol of 0 the first entry above it (the warp sums in
    // another order, so a sum right at the threshold may fall either way)
    if (std::fabs(sum) > 2 * pmrl::kSignTol) check(sum > 0, "canonical sign: column sum", M, sum);
    if (std::fabs(sum) < 0.5 * pmrl::kSignTol) check(first >= 0, "canonical sign: first entry", M, first);
  }
}

// warp_backward_coefficients against backward_coefficients on the same S, U and reductions: the coefficient matrix
// a, e, out_scale and r.
template <class T, int M>
void backward_matches(Kind kind, int dim, bool normalize, bool with_grad_s, bool with_grad_lead, T tol) {
  const std::vector<double> z = draw<T, M>(kind, dim);
  T g[M][M], r_one[M];
  gram<T, M>(z, dim, g);
  for (int m = 0; m < M; ++m) r_one[m] = T(1);
  const pmrl::Spectrum<T, M> sp = one_lane_spectrum<T, M>(g, r_one, normalize, dim);
  T grad_s[M], sq[M], zg[M];
  std::vector<T> gbar(dim);
  for (T& x : gbar) x = T(normal());
  for (int m = 0; m < M; ++m) {
    grad_s[m] = T(normal());
    sq[m] = g[m][m];
    zg[m] = T(0);
    for (int d = 0; d < dim; ++d) zg[m] += T(z[m * dim + d]) * gbar[d];
  }
  T a_one[M][M], e_one[M], scale_one[M], r_copy[M];
  for (int m = 0; m < M; ++m) r_copy[m] = T(1);
  pmrl::backward_coefficients<T, M>(sp.s, sp.u, with_grad_s ? grad_s : nullptr, with_grad_lead, sq, zg,
                                    normalize, r_copy, a_one, e_one, scale_one);

  constexpr int N = warp_size(M);
  T a[N][M], e[N][M], scale[N][M], r[N][M];
  EmulatedWarp<N> warp;
  warp.run([&](const EmulatedWarp<N>& w) {
    const int l = w.lane();
    T u_row[M], s[M], sq_l[M], zg_l[M];
    for (int k = 0; k < M; ++k) {
      u_row[k] = l < M ? sp.u[l][k] : T(0);
      s[k] = sp.s[k];
      sq_l[k] = sq[k];
      zg_l[k] = zg[k];
      r[l][k] = T(1);
    }
    pmrl::warp_backward_coefficients<EmulatedWarp<N>, T, M>(w, s, u_row, with_grad_s ? grad_s : nullptr,
                                                            with_grad_lead, sq_l, zg_l, normalize, r[l], a[l],
                                                            e[l], scale[l]);
  });
  double top = 0;
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < M; ++n) top = std::fmax(top, std::fabs(double(a_one[m][n])));
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < M; ++n)
      check(std::fabs(double(a[m][n] - a_one[m][n])) <= double(tol) * (top + 1), "backward a", M,
            double(a[m][n] - a_one[m][n]));
    for (int l = 0; l < N; ++l) {
      check(std::fabs(double(e[l][m] - e_one[m])) <= double(tol) * (std::fabs(double(e_one[m])) + 1), "backward e",
            M, double(e[l][m] - e_one[m]));
      check(scale[l][m] == scale_one[m], "backward out_scale", M, double(scale[l][m] - scale_one[m]));
      check(r[l][m] == r_copy[m], "backward r", M, double(r[l][m] - r_copy[m]));
    }
  }
}

// A non-finite entry: NaN in every lane's S, U and coefficients, and the solve returns.
template <int M>
void non_finite_stays_nan() {
  double g[M][M], r[M];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < M; ++n) g[m][n] = m == n ? 2.0 : 0.1;
    r[m] = 1.0;
  }
  g[M - 1][0] = NAN;  // in one lane's row only
  const WarpSpectrum<double, M> warp = warp_spectrum<double, M>(g, r, true, 8);
  bool all_nan = true;
  for (int l = 0; l < WarpSpectrum<double, M>::N; ++l)
    for (int k = 0; k < M; ++k) {
      all_nan = all_nan && std::isnan(warp.s[l][k]) && std::isnan(warp.coef[l][k]);
      if (l < M) all_nan = all_nan && std::isnan(warp.u[l][k]);
    }
  check(all_nan, "non-finite input gives NaN everywhere", M);
}

// A diagonal Gram matrix with repeated entries: neither solver rotates, so U is the permutation the sort makes,
// exact ties in index order, and both must give the same S, U and lead coefficients exactly.
template <int M>
void diagonal_ties_match() {
  double g[M][M] = {}, r[M];
  for (int m = 0; m < M; ++m) {
    g[m][m] = m % 3 == 0 ? 0.0 : (m % 3 == 1 ? 2.0 : 0.5);
    r[m] = 1.0;
  }
  const pmrl::Spectrum<double, M> one = one_lane_spectrum<double, M>(g, r, false, 2 * M);
  const WarpSpectrum<double, M> warp = warp_spectrum<double, M>(g, r, false, 2 * M);
  bool same = true;
  for (int k = 0; k < M; ++k) {
    same = same && warp.s[0][k] == one.s[k] && warp.coef[0][k] == one.lead_coef[k];
    for (int m = 0; m < M; ++m) same = same && warp.u[m][k] == one.u[m][k];
  }
  check(same, "diagonal ties: S, U and lead coefficients as the one-lane solve", M);
}

// The round-robin schedule pairs every two indices exactly once a sweep, each round a perfect matching.
void round_robin_covers_every_pair() {
  for (int n = 2; n <= 16; n += 2) {
    std::vector<int> seen(n * n, 0);
    for (int t = 0; t < n - 1; ++t) {
      for (int l = 0; l < n; ++l) {
        const int p = pmrl::round_robin_partner(l, t, n);
        check(p != l && p >= 0 && p < n && pmrl::round_robin_partner(p, t, n) == l, "round-robin matching", n);
        ++seen[l * n + p];
      }
    }
    for (int a = 0; a < n; ++a)
      for (int b = 0; b < n; ++b) check(seen[a * n + b] == (a != b), "round-robin coverage", n);
  }
}

template <int M>
void all_checks() {
  const Kind kinds[] = {Kind::kRandom, Kind::kRankOne, Kind::kDuplicated, Kind::kZeroRow, Kind::kFaintRow,
                        Kind::kNearTie, Kind::kHuge, Kind::kTiny};
  for (Kind kind : kinds) {
    for (bool normalize : {true, false}) {
      // D > M, and D < M for the kinds whose rows are independent
      const bool short_rows = kind == Kind::kRandom || kind == Kind::kNearTie;
      for (int dim : {M + 3, short_rows && M > 2 ? M - 1 : 0}) {
        if (dim == 0) continue;
        spectrum_matches<double, M>(kind, dim, normalize, 1e-11);
        spectrum_matches<float, M>(kind, dim, normalize, 2e-5f);
      }
    }
  }
  // both versions get the same S and U, so degenerate spectra (zero rows, ties, D < M) compare too; every
  // combination of upstream gradients on random rows, both on the others
  const Kind backward_kinds[] = {Kind::kRandom, Kind::kRankOne, Kind::kDuplicated, Kind::kZeroRow, Kind::kFaintRow,
                                 Kind::kNearTie};
  for (Kind kind : backward_kinds)
    for (int dim : {M + 5, M > 2 ? M - 1 : 1})
      for (bool normalize : {true, false})
        for (bool grad_s : {true, false})
          for (bool grad_lead : {true, false}) {
            if (!(grad_s && grad_lead) && (kind != Kind::kRandom || !(grad_s || grad_lead))) continue;
            backward_matches<double, M>(kind, dim, normalize, grad_s, grad_lead, 1e-10);
            if (kind == Kind::kRandom) backward_matches<float, M>(kind, dim, normalize, grad_s, grad_lead, 2e-3f);
          }
  diagonal_ties_match<M>();
  non_finite_stays_nan<M>();
}

template <int... Ms>
void every_m(std::integer_sequence<int, Ms...>) {
  (all_checks<Ms + pmrl::kMinM>(), ...);
}

}  // namespace

int main() {
  round_robin_covers_every_pair();
  every_m(std::make_integer_sequence<int, pmrl::kMaxM - pmrl::kMinM + 1>{});
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("warp maths: all checks passed\n");
  return EXIT_SUCCESS;
}
