// gram_eig_backward's kernels for 7 <= M <= 8 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<7, 8>(const pmrl::BackwardArgs&, cudaStream_t);
