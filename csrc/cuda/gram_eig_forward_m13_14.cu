// gram_eig's kernels for 13 <= M <= 14 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<13, 14>(const pmrl::ForwardArgs&, cudaStream_t);
