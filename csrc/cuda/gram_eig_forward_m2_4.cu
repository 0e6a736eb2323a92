// gram_eig's kernels for 2 <= M <= 4 (one of the files that split the instantiations, see kernels.cuh).
#include "gram_eig_forward.cuh"

template cudaError_t pmrl::cuda::gram_eig_forward_in<2, 4>(const pmrl::ForwardArgs&, cudaStream_t);
