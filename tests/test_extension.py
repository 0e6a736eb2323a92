"""What is specific to the compiled backends "cpp" (CPU) and "cuda" (CUDA), the extension pmrl_kernels._C: the C++
self-checks (ctest), op registration (opcheck, argument checks), the gradient layout, the
CUDA stream. Values, gradients, dtypes, layouts, degenerate and non-finite input, torch.compile: every backend in
tests/test_conformance.py; bare-nvcc compilation of every .cu file: tests/test_static_gpu.py.

Tests that need the built extension skip when pmrl_kernels._C cannot be imported, unless
PMRL_REQUIRE_EXTENSION=1 (CI), where they fail.
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import random_embeddings, requires_cuda
from pmrl_kernels import backends, pmrl_loss
from pmrl_kernels.ops import extension

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
ops = torch.ops.pmrl_kernels

every_device = pytest.mark.parametrize("device", DEVICES)


needs_kernels = pytest.mark.usefixtures("compiled_extension")


@needs_kernels
def test_registered_where_built():
    """The registry offers "cpp" on CPU tensors, and "cuda" exactly where the build has CUDA and a GPU is here."""
    assert backends.implementations("gram_eig", "cpu")["cpp"] is extension.gram_eig
    assert ("cuda" in backends.implementations("gram_eig", "cuda")) == (
        extension.load().with_cuda and torch.cuda.is_available())
    assert "cpp" not in backends.implementations("gram_eig", "cuda")
    assert "cuda" not in backends.implementations("gram_eig", "cpu")
    assert "contrastive" not in backends.REGISTRY["cpp"].ops  # the loss's contrastive op resolves as under "auto"


@needs_kernels
def test_origin_names_the_loaded_module(compiled_extension):
    kind, path = extension.origin().rsplit(" ", 1)
    assert kind in ("installed build", "first-use cache", "compiled into")
    assert Path(path) == Path(compiled_extension.__file__)


@needs_kernels
def test_auto_picks_the_extension_on_cpu():
    zs = list(torch.randn(2, 3, 4).unbind(1))
    assert backends.resolve("gram_eig", "auto", (zs,)) is extension.gram_eig


@needs_kernels
@every_device
def test_list_input_gradients_are_views_not_copies(device):
    # the backward writes dL/dz modality-major, so each modality's gradient is a contiguous view autograd keeps
    b, m, d = 8, 3, 32
    xs = [t.contiguous().requires_grad_() for t in random_embeddings(b, m, d, torch.float32, device=device).unbind(1)]
    pmrl_loss(xs, backend=BACKEND[device]).backward()
    offsets = [x.grad.data_ptr() - xs[0].grad.data_ptr() for x in xs]
    assert offsets == [k * b * d * 4 for k in range(m)]
    assert all(x.grad.is_contiguous() for x in xs)


@needs_kernels
@requires_cuda
def test_cuda_uses_the_current_stream_and_never_syncs():
    z = random_embeddings(64, 4, 96, torch.float32, device="cuda")
    xs = [t.contiguous().requires_grad_() for t in z.unbind(1)]
    expected = pmrl_loss(xs, backend="cuda")
    (grad_expected,) = torch.autograd.grad(expected, xs[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        with torch.cuda.stream(stream):
            parts = pmrl_loss(xs, backend="cuda", output_dict=True)
            loss = parts["align"] + parts["reg"]
            (grad,) = torch.autograd.grad(loss, xs[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, grad_expected)


def sample_inputs(device):
    """(op, args) for torch.library.opcheck of both ops."""
    samples = []
    for (b, m, d), dtype, normalize in [((3, 2, 5), torch.float32, True), ((4, 5, 16), torch.float64, False),
                                        ((2, 3, 8), torch.bfloat16, True), ((5, 16, 3), torch.float16, True)]:
        zs = list(random_embeddings(b, m, d, dtype, device=device).unbind(1))
        samples.append((ops.cxx_gram_eig_fwd, (zs, normalize)))
        s, u, lead = ops.cxx_gram_eig_fwd(zs, normalize)
        for grad_s, grad_lead in ((torch.randn_like(s), torch.randn_like(lead)), (None, torch.randn_like(lead)),
                                  (torch.randn_like(s), None)):
            samples.append((ops.cxx_gram_eig_bwd, (zs, s, u, grad_s, grad_lead, normalize)))
    return samples


@needs_kernels
@every_device
def test_opcheck(device):
    for op, args in sample_inputs(device):
        torch.library.opcheck(op.default, args)


@needs_kernels
def test_unsupported_inputs():
    """The compiled kernels refuse what they have no kernel for (the reasons backend="auto" reads); the public
    checks refuse non-floating input before any kernel sees it."""
    assert "M = 17" in extension.gram_eig_unsupported(list(torch.randn(3, 17, 8).unbind(1)))
    assert "meta" in extension.gram_eig_unsupported(list(torch.randn(3, 2, 8, device="meta").unbind(1)))
    assert not extension.is_available("meta")
    with pytest.raises(TypeError, match="floating tensor"):
        pmrl_loss(torch.ones(3, 2, 8, dtype=torch.int32), backend="cpp")


@needs_kernels
def test_ops_check_their_arguments():
    zs = list(torch.randn(3, 4, 8).unbind(1))
    s, u, lead = ops.cxx_gram_eig_fwd(zs, True)
    for bad, message in ((([zs[0]]), "2 to 16 modalities, got 1"), (zs * 5, "2 to 16 modalities, got 20"),
                         (zs[:3] + [torch.randn(3, 9)], r"zs\[3\] has shape \[3, 9\]"),
                         (zs[:3] + [zs[3].double()], r"zs\[3\] is Double"),
                         ([torch.randn(3, 2, 4)] * 2, "must be 2-D"),
                         (zs[:3] + [zs[3].to(torch.int32)], r"zs\[3\] is Int")):
        with pytest.raises(RuntimeError, match=f"pmrl_kernels: .*{message}"):
            ops.cxx_gram_eig_fwd(bad, True)
    with pytest.raises(RuntimeError, match="S must have shape"):
        ops.cxx_gram_eig_bwd(zs, s[:, :3], u, None, None, True)
    with pytest.raises(RuntimeError, match="grad_lead must have shape"):
        ops.cxx_gram_eig_bwd(zs, s, u, None, lead[:, :4], True)


def test_header_maths_ctest(tmp_path):
    """Build the C++ self-checks of the header maths (one lane, and spread over an emulated warp) with CMake (no
    torch needed) and run them through ctest."""
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake, ctest or a C++ compiler is missing")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DPMRL_BUILD_EXTENSION=OFF"], check=True,
                   capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--target", "test_header_maths", "test_warp_maths"], check=True,
                   capture_output=True)
    result = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
