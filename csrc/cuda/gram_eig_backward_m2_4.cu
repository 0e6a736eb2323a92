// gram_eig_backward's kernels for 2 <= M <= 4 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_backward.cuh"

template cudaError_t pmrl::cuda::gram_eig_backward_in<2, 4>(const pmrl::BackwardArgs&, cudaStream_t);
