// gram_eig_backward's kernels for 16 <= M <= 16 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<16, 16>(const pmrl::BackwardArgs&, cudaStream_t);
