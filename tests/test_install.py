"""The install paths of the C++ extension (pmrl_kernels/extension_build.py): built at install when torch is
importable in the build environment, compiled on first use otherwise, never at import, and a failed build leaves
the other backends working with a message that says how to get it.

Each test runs a fresh Python in which the installed pmrl_kernels._C cannot be imported (as after an isolated
`pip install .`), with torch's extension cache in a temporary folder.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# makes `pmrl_kernels._C` unimportable, as it is when pip's isolated build had no torch to build it with
HIDE_INSTALLED = textwrap.dedent("""
    import importlib.abc, sys

    class HideInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "pmrl_kernels._C":
                raise ImportError("hidden by the test: as after an isolated install")

    sys.meta_path.insert(0, HideInstalled())
""")


def run_python(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PMRL_SKIP_EXTENSION", "TRITON_INTERPRET")}
    environ.update(TORCH_EXTENSIONS_DIR=str(cache), PYTHONWARNINGS="default", **env)
    result = subprocess.run([sys.executable, "-c", HIDE_INSTALLED + textwrap.dedent(code)], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


CHECK_LOSS = """
    import torch
    from pmrl_kernels import available_backends, pmrl_loss
    from pmrl_kernels.ops import extension

    backends = available_backends()
    print("backends", backends)
    z = torch.randn(16, 3, 40, dtype=torch.float64)
    expected = pmrl_loss(z, backend="reference")
    for name in backends:
        got = pmrl_loss(z.float(), backend=name).double()
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (name, got, expected)
    print("load_error", extension.load_error())
"""


def test_import_never_builds(tmp_path):
    result = run_python("""
        import pmrl_kernels
        from pmrl_kernels.ops import extension
        assert extension.load_error() is None and extension._loaded is None, "import looked for the extension"
    """, tmp_path)
    assert "compiling" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_failed_build_leaves_the_other_backends_and_says_how(tmp_path):
    result = run_python(CHECK_LOSS, tmp_path, CXX="/bin/false")
    assert "cpp" not in result.stdout.split("backends", 1)[1].splitlines()[0]
    assert "first-use build failed" in result.stdout
    warning = [line for line in result.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warning) == 1, result.stderr  # once per process, though every backend query asks again
    assert "To get the 'cpp' backend" in warning[0] and "--no-build-isolation" in warning[0]


def test_skip_switch_builds_nothing_and_says_nothing(tmp_path):
    result = run_python(CHECK_LOSS, tmp_path, PMRL_SKIP_EXTENSION="1")
    assert "PMRL_SKIP_EXTENSION=1" in result.stdout
    assert "Warning" not in result.stderr and "compiling" not in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_first_use_build_compiles_once_then_loads_from_the_cache(tmp_path):
    """The path a plain `pip install .` takes: about 1.5 minutes of compiling here, once."""
    first = run_python(CHECK_LOSS, tmp_path)
    assert "'cpp'" in first.stdout and "load_error None" in first.stdout
    assert "compiling the C++ extension once" in first.stderr and "ready, compiled in" in first.stderr
    again = run_python(CHECK_LOSS, tmp_path)
    assert "'cpp'" in again.stdout and "compiling" not in again.stderr


def test_install_ships_the_sources_and_the_type_marker(tmp_path):
    """A regular install (not editable) holds csrc/ inside the package, for its first-use build, and py.typed."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "PMRL_SKIP_EXTENSION": "1"})
    package = tmp_path / "pmrl_kernels"
    assert (package / "py.typed").is_file()
    assert (package / "csrc" / "bindings.cpp").is_file()
    assert sorted(p.name for p in (package / "csrc" / "cuda").glob("*.cu")) == sorted(
        p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    # the installed copy is the one the first-use build finds
    found = subprocess.run([sys.executable, "-c", "import extension_build; print(extension_build.source_root())"],
                           cwd=package, capture_output=True, text=True, check=True)
    assert Path(found.stdout.strip()) == package / "csrc"
