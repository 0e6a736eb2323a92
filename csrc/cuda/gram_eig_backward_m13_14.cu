// gram_eig_backward's kernels for 13 <= M <= 14 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<13, 14>(const pmrl::BackwardArgs&, cudaStream_t);
