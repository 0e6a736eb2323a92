// CPU launchers: the kernels of kernels.h for the baseline instruction set, and the run-time choice between them
// and the AVX2 + FMA copy (gram_eig_cpu_avx2.cpp).
#define PMRL_CPU_ISA baseline
#include "kernels.h"

namespace pmrl::cpu {

namespace avx2 {
void gram_eig_forward(const ForwardArgs& args);
void gram_eig_backward(const BackwardArgs& args);
}  // namespace avx2

namespace {
bool has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}
}  // namespace

void gram_eig_forward(const ForwardArgs& args) {
  has_avx2() ? avx2::gram_eig_forward(args) : baseline::gram_eig_forward(args);
}

void gram_eig_backward(const BackwardArgs& args) {
  has_avx2() ? avx2::gram_eig_backward(args) : baseline::gram_eig_backward(args);
}

}  // namespace pmrl::cpu
