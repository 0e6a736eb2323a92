// gram_eig's kernels for 11 <= M <= 12 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<11, 12>(const pmrl::ForwardArgs&, cudaStream_t);
