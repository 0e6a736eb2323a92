// gram_eig_backward's kernels for 11 <= M <= 12 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<11, 12>(const pmrl::BackwardArgs&, cudaStream_t);
