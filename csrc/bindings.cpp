// The torch binding of pmrl_kernels._C: op schemas, input checks, output allocation, and the CPU and CUDA
// implementations, which hand raw pointers to the launchers of pmrl/launch.h. The Python layer
// (pmrl_kernels/ops/extension.py) validates arguments first; the TORCH_CHECKs here are the backstop for direct
// calls of torch.ops.pmrl_kernels.cxx_*.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "pmrl/launch.h"

#ifdef PMRL_WITH_CUDA
// c10's stream and guard headers rather than ATen/cuda/CUDAContext.h (at::cuda::getCurrentCUDAStream is this
// same c10 function): they need no cuBLAS/cuSPARSE headers, so this file compiles with a cut-down toolkit too.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using at::Tensor;

pmrl::DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return pmrl::DType::kFloat32;
    case at::kDouble: return pmrl::DType::kFloat64;
    case at::kHalf: return pmrl::DType::kFloat16;
    case at::kBFloat16: return pmrl::DType::kBFloat16;
    default: TORCH_CHECK(false, "pmrl_kernels: embeddings must be float16, bfloat16, float32 or float64, got ", t);
  }
}

// reference/inputs.compute_dtype: float64 stays float64, everything else runs in float32.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The M embedding tensors as row pointers. A tensor whose features are not contiguous is copied (the copy is
// kept alive here); any row stride is read in place.
struct Modalities {
  std::vector<Tensor> tensors;
  pmrl::Rows rows{};
  int m = 0;
  int64_t batch = 0, dim = 0;
  at::ScalarType dtype = at::kFloat;

  explicit Modalities(at::TensorList zs) : m(static_cast<int>(zs.size())) {
    TORCH_CHECK(m >= pmrl::kMinM && m <= pmrl::kMaxM, "pmrl_kernels: the kernels take ", pmrl::kMinM, " to ",
                pmrl::kMaxM, " modalities, got ", m);
    const Tensor& first = zs[0];
    TORCH_CHECK(first.dim() == 2, "pmrl_kernels: each embedding tensor must be 2-D [B, D], got shape ",
                first.sizes());
    batch = first.size(0);
    dim = first.size(1);
    dtype = first.scalar_type();
    dtype_code(dtype);
    TORCH_CHECK(dim >= 1, "pmrl_kernels: embeddings need D >= 1");
    for (int i = 0; i < m; ++i) {
      Tensor z = zs[i];
      TORCH_CHECK(z.sizes() == first.sizes(), "pmrl_kernels: zs[", i, "] has shape ", z.sizes(), ", zs[0] ",
                  first.sizes());
      TORCH_CHECK(z.scalar_type() == dtype, "pmrl_kernels: zs[", i, "] is ", z.scalar_type(), ", zs[0] ", dtype);
      TORCH_CHECK(z.device() == first.device(), "pmrl_kernels: zs[", i, "] is on ", z.device(), ", zs[0] on ",
                  first.device());
      if (dim > 1 && z.stride(1) != 1) z = z.contiguous();
      rows.ptr[i] = z.data_ptr();
      rows.stride[i] = z.stride(0);
      tensors.push_back(std::move(z));
    }
  }

  at::TensorOptions compute_options() const { return tensors[0].options().dtype(compute_type(dtype)); }
};

// t in the compute type, contiguous, of the given shape.
Tensor prepared(const Tensor& t, at::IntArrayRef shape, const Modalities& z, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "pmrl_kernels: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == z.tensors[0].device(), "pmrl_kernels: ", name, " is on ", t.device(),
              ", the embeddings on ", z.tensors[0].device());
  return t.to(compute_type(z.dtype)).contiguous();
}

template <class Launch>
std::tuple<Tensor, Tensor, Tensor> gram_eig_impl(at::TensorList zs, bool normalize, Launch launch) {
  const Modalities z(zs);
  const auto options = z.compute_options();
  Tensor s = at::empty({z.batch, z.m}, options);
  Tensor u = at::empty({z.batch, z.m, z.m}, options);
  Tensor lead = at::empty({z.batch, z.dim}, options);
  if (z.batch > 0) {
    launch(pmrl::ForwardArgs{z.rows, dtype_code(z.dtype), z.m, z.batch, z.dim, normalize, s.data_ptr(),
                             u.data_ptr(), lead.data_ptr()});
  }
  return {s, u, lead};
}

template <class Launch>
Tensor gram_eig_backward_impl(at::TensorList zs, const Tensor& s, const Tensor& u,
                              const std::optional<Tensor>& grad_s, const std::optional<Tensor>& grad_lead,
                              bool normalize, Launch launch) {
  const Modalities z(zs);
  const Tensor s_c = prepared(s, {z.batch, z.m}, z, "S");
  const Tensor u_c = prepared(u, {z.batch, z.m, z.m}, z, "U");
  const Tensor grad_s_c = grad_s ? prepared(*grad_s, {z.batch, z.m}, z, "grad_S") : Tensor();
  const Tensor grad_lead_c = grad_lead ? prepared(*grad_lead, {z.batch, z.dim}, z, "grad_lead") : Tensor();
  // [B, M, D] laid out modality-major: dz[:, m] is a contiguous [B, D] tensor, so the per-modality gradients of
  // list input are views that autograd keeps as they are (no copy to match the inputs' layout).
  Tensor dz = at::empty({z.m, z.batch, z.dim}, z.tensors[0].options()).transpose(0, 1);
  if (z.batch > 0) {
    launch(pmrl::BackwardArgs{z.rows, dtype_code(z.dtype), z.m, z.batch, z.dim, normalize, s_c.data_ptr(),
                              u_c.data_ptr(), grad_s_c.defined() ? grad_s_c.data_ptr() : nullptr,
                              grad_lead_c.defined() ? grad_lead_c.data_ptr() : nullptr, dz.data_ptr(), dz.stride(0),
                              dz.stride(1)});
  }
  return dz;
}

std::tuple<Tensor, Tensor, Tensor> gram_eig_cpu(at::TensorList zs, bool normalize) {
  return gram_eig_impl(zs, normalize, [](const pmrl::ForwardArgs& args) { pmrl::cpu::gram_eig_forward(args); });
}

Tensor gram_eig_backward_cpu(at::TensorList zs, const Tensor& s, const Tensor& u,
                             const std::optional<Tensor>& grad_s, const std::optional<Tensor>& grad_lead,
                             bool normalize) {
  return gram_eig_backward_impl(zs, s, u, grad_s, grad_lead, normalize,
                                [](const pmrl::BackwardArgs& args) { pmrl::cpu::gram_eig_backward(args); });
}

#ifdef PMRL_WITH_CUDA
void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "pmrl_kernels: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor, Tensor> gram_eig_cuda(at::TensorList zs, bool normalize) {
  TORCH_CHECK(!zs.empty(), "pmrl_kernels: zs is empty");
  const c10::cuda::CUDAGuard guard(zs[0].device());
  return gram_eig_impl(zs, normalize, [](const pmrl::ForwardArgs& args) {
    check_launch(pmrl::cuda::gram_eig_forward(args, c10::cuda::getCurrentCUDAStream()));
  });
}

Tensor gram_eig_backward_cuda(at::TensorList zs, const Tensor& s, const Tensor& u,
                              const std::optional<Tensor>& grad_s, const std::optional<Tensor>& grad_lead,
                              bool normalize) {
  TORCH_CHECK(!zs.empty(), "pmrl_kernels: zs is empty");
  const c10::cuda::CUDAGuard guard(zs[0].device());
  return gram_eig_backward_impl(zs, s, u, grad_s, grad_lead, normalize, [](const pmrl::BackwardArgs& args) {
    check_launch(pmrl::cuda::gram_eig_backward(args, c10::cuda::getCurrentCUDAStream()));
  });
}
#endif

}  // namespace

// One namespace for every op of the package, named <implementation>_<op>_<fwd|bwd>: these are "cxx_"; the
// Triton ops (pmrl_kernels/ops/triton_*.py) add "triton_" ones to the same namespace as fragments.
TORCH_LIBRARY_FRAGMENT(pmrl_kernels, m) {
  m.def("cxx_gram_eig_fwd(Tensor[] zs, bool normalize) -> (Tensor S, Tensor U, Tensor lead)");
  m.def(
      "cxx_gram_eig_bwd(Tensor[] zs, Tensor S, Tensor U, Tensor? grad_S, Tensor? grad_lead, bool normalize) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(pmrl_kernels, CPU, m) {
  m.impl("cxx_gram_eig_fwd", &gram_eig_cpu);
  m.impl("cxx_gram_eig_bwd", &gram_eig_backward_cpu);
}

#ifdef PMRL_WITH_CUDA
TORCH_LIBRARY_IMPL(pmrl_kernels, CUDA, m) {
  m.impl("cxx_gram_eig_fwd", &gram_eig_cuda);
  m.impl("cxx_gram_eig_bwd", &gram_eig_backward_cuda);
}
#endif

// Importing pmrl_kernels._C runs the registrations above; the module itself only says what was compiled.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("with_cuda") =
#ifdef PMRL_WITH_CUDA
      true;
#else
      false;
#endif
  // The numeric contract as compiled (pmrl_kernels/constants.py holds the Python copy; a test compares them).
  module.def("constants", [] {
    pybind11::dict c;
    c["SIGMA_EPS"] = pmrl::kSigmaEps;
    c["GAP_EPS"] = pmrl::kGapEps;
    c["NORM_EPS"] = pmrl::kNormEps;
    c["SIGN_TOL"] = pmrl::kSignTol;
    c["MIN_MODALITIES"] = pmrl::kMinM;
    c["MAX_MODALITIES"] = pmrl::kMaxM;
    c["JACOBI_REL_TOL"] = pmrl::kJacobiRelTol;
    c["JACOBI_MAX_SWEEPS"] = pmrl::kMaxSweeps;
    return c;
  });
}
