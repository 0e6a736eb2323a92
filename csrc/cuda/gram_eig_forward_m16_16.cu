// gram_eig's kernels for 16 <= M <= 16 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<16, 16>(const pmrl::ForwardArgs&, cudaStream_t);
