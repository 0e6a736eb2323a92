// gram_eig's kernels for 15 <= M <= 15 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<15, 15>(const pmrl::ForwardArgs&, cudaStream_t);
