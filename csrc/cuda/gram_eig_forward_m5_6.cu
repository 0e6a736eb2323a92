// gram_eig's kernels for 5 <= M <= 6 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<5, 6>(const pmrl::ForwardArgs&, cudaStream_t);
