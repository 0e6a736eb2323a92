"""The numeric contract every backend follows (docs/maths.md, "Singular cases").

These are the only Python copies. The C++ header csrc/include/pmrl/common.h holds the same values for the CPU and
CUDA kernels and the extension exports them (`pmrl_kernels._C.constants()`); the Triton kernels read them from
here; tests/test_constants.py asserts every copy equal.
"""
SIGMA_EPS = 1e-3  # floor of 1/sigma_k, relative to sigma_1
GAP_EPS = 1e-4  # floor of 1/(lambda_1 - lambda_k), relative to lambda_1
NORM_EPS = 1e-12  # rows shorter than this are divided by it, as torch.nn.functional.normalize
SIGN_TOL = 1e-4  # column sums within this of 0 are sign ties

# Temperatures below this are refused: logits sigma / tau and their gradients 1 / tau must stay far from the
# float32 range, and no training recipe goes near it (open_clip clamps 1 / tau at 100).
MIN_TEMPERATURE = 1e-4

MIN_MODALITIES = 2
MAX_MODALITIES = 16  # the compiled and Triton kernels: one row pointer per modality

# Cyclic Jacobi: a pair (p, q) is rotated while a_pq^2 > (JACOBI_REL_TOL * eps)^2 |a_pp a_qq| (eps of the compute
# dtype), the test that gives small eigenvalues high relative accuracy; a sweep with no rotation ends the solve.
# Quadratic convergence needs about 10 sweeps at M = 16 in float64: the cap only bounds pathological input.
JACOBI_REL_TOL = 1.0
JACOBI_MAX_SWEEPS = 40
