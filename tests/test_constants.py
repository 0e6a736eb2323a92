"""One numeric contract (pmrl_kernels.constants), every copy equal: the C++ header (exported by the extension as
_C.constants()), the Triton kernels, the reference, and the package version against its installed metadata."""
import importlib.metadata

import pytest
import torch

import pmrl_kernels
from pmrl_kernels import constants, reference, terms
from pmrl_kernels.ops import extension

# constants only the Python layer reads (argument checks before any kernel runs): the kernels have no copy
PYTHON_ONLY = {"MIN_TEMPERATURE"}


def python_constants():
    return {name: value for name, value in vars(constants).items() if name.isupper() and not name.startswith("_")}



def test_extension_exports_the_same_constants(compiled_extension):
    exported = compiled_extension.constants()
    ours = python_constants()
    assert set(exported) == set(ours) - PYTHON_ONLY, (
        f"only in C++: {set(exported) - set(ours)}; only in Python: {set(ours) - PYTHON_ONLY - set(exported)}"
    )
    for name, value in exported.items():
        assert value == ours[name] and type(value) is type(ours[name]), f"{name}: C++ {value!r}, Python {ours[name]!r}"


def test_compiled_ops_refuse_by_the_same_modality_limits(compiled_extension):
    zs = list(torch.randn(3, constants.MAX_MODALITIES + 1, 4).unbind(1))
    limits = f"{constants.MIN_MODALITIES} to {constants.MAX_MODALITIES} modalities"
    for bad in (zs, zs[:constants.MIN_MODALITIES - 1]):
        with pytest.raises(RuntimeError, match=limits):
            torch.ops.pmrl_kernels.cxx_gram_eig_fwd(bad, True)
    for good in (zs[:constants.MAX_MODALITIES], zs[:constants.MIN_MODALITIES]):
        torch.ops.pmrl_kernels.cxx_gram_eig_fwd(good, True)


def test_python_layer_reads_the_constants():
    assert (reference.SIGMA_EPS, reference.GAP_EPS, reference.NORM_EPS) == (
        constants.SIGMA_EPS, constants.GAP_EPS, constants.NORM_EPS)
    assert terms.SIGN_TOL == constants.SIGN_TOL
    assert (extension.MIN_MODALITIES, extension.MAX_MODALITIES) == (constants.MIN_MODALITIES,
                                                                    constants.MAX_MODALITIES)


def test_triton_kernels_read_the_constants():
    triton_gram = pytest.importorskip("pmrl_kernels.ops.triton_gram")
    from pmrl_kernels.ops import triton_instance

    assert triton_gram.MAX_M == constants.MAX_MODALITIES
    assert triton_gram.MIN_MODALITIES == constants.MIN_MODALITIES
    for name in ("SIGMA_EPS", "GAP_EPS", "NORM_EPS", "SIGN_TOL"):
        assert getattr(triton_instance, name).value == getattr(constants, name), name
    assert triton_instance.JACOBI_TOL.value == constants.JACOBI_REL_TOL * torch.finfo(torch.float32).eps


def test_triton_sweep_cap_comes_from_the_constants(monkeypatch):
    """The forward launch passes JACOBI_MAX_SWEEPS as the kernel's cap, read at launch: with a cap of 0 the Jacobi
    solve does nothing (S = the sqrt of G's diagonal: 1 for normalised rows), with the constant's it converges."""
    triton_gram = pytest.importorskip("pmrl_kernels.ops.triton_gram")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_gram.is_available(device):
        pytest.skip("Triton cannot run here")
    launches = []
    wrap = triton_gram.wrap_triton

    def recording(kernel):
        launcher = wrap(kernel)

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel.__name__, kwargs))
                    return launcher[grid](*args, **kwargs)
                return launch
        return Recorder()

    monkeypatch.setattr(triton_gram, "wrap_triton", recording)
    z = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(0)).to(device)
    s, _, _ = triton_gram.gram_eig_fwd(list(z.unbind(1)), True)
    assert launches == [("_gram_eig_fwd_kernel", launches[0][1])]
    assert launches[0][1]["MAX_SWEEPS"] == constants.JACOBI_MAX_SWEEPS
    expected = reference.gram_eig_forward([t.double().cpu() for t in z.unbind(1)], True)[0]
    torch.testing.assert_close(s.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(triton_gram, "JACOBI_MAX_SWEEPS", 0)
    s0, u0, _ = triton_gram.gram_eig_fwd(list(z.unbind(1)), True)
    assert launches[-1][1]["MAX_SWEEPS"] == 0
    torch.testing.assert_close(s0.cpu(), torch.ones(8, 3), rtol=1e-6, atol=1e-6)
    u0 = u0.abs().cpu()  # unrotated: the identity, columns sorted by the (tied) diagonal
    assert torch.equal(u0 @ u0.transpose(1, 2), torch.eye(3).expand(8, 3, 3)) and set(u0.unique().tolist()) <= {0, 1}


def test_version_is_the_installed_one():
    assert pmrl_kernels.__version__ == importlib.metadata.version("pmrl_kernels")
