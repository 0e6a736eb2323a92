// gram_eig_backward's kernels for 5 <= M <= 6 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<5, 6>(const pmrl::BackwardArgs&, cudaStream_t);
