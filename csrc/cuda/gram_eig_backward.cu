// The launcher of gram_eig_backward: picks the instantiation file of args.m (PMRL_M_RANGES in kernels.cuh).
#include "kernels.cuh"

namespace pmrl::cuda {

#define PMRL_DECLARE(LO, HI) extern template cudaError_t gram_eig_backward_in<LO, HI>(const BackwardArgs&, cudaStream_t);
PMRL_M_RANGES(PMRL_DECLARE)
#undef PMRL_DECLARE

cudaError_t gram_eig_backward(const BackwardArgs& args, cudaStream_t stream) {
#define PMRL_PICK(LO, HI) \
  if (args.m >= (LO) && args.m <= (HI)) return gram_eig_backward_in<LO, HI>(args, stream);
  PMRL_M_RANGES(PMRL_PICK)
#undef PMRL_PICK
  return cudaErrorInvalidValue;  // unreachable: the binding checks kMinM <= m <= kMaxM
}

}  // namespace pmrl::cuda
