// The CPU kernels of kernels.h compiled for AVX2 + FMA (8 floats per instruction instead of SSE2's 4), used
// where the CPU has them (see gram_eig_cpu.cpp). Every header is included before the target switch, so only
// this file's own functions, in namespace pmrl::cpu::avx2, are compiled for AVX2: nothing inline that another
// translation unit also defines can end up in AVX2 code.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "pmrl/instance.h"
#include "pmrl/launch.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma")
#elif defined(__x86_64__) && defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define PMRL_CLANG_TARGET_PUSHED
#endif

#define PMRL_CPU_ISA avx2
#include "kernels.h"

#ifdef PMRL_CLANG_TARGET_PUSHED
#pragma clang attribute pop
#endif
