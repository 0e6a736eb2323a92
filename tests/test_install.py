"""The install paths of the C++ extension (pmrl_kernels/extension_build.py): built at install when torch is
importable in the build environment, compiled on first use otherwise, never at import, and a failed build leaves
the other backends working with a message that says how to get it. Builds are keyed on what decides the binary: an
unchanged build is loaded, never redone, and says where it comes from; a compile says so first, with its progress.

Most tests run a fresh Python in which the installed pmrl_kernels._C cannot be imported (as after an isolated
`pip install .`), with torch's extension cache in a temporary folder; FAKE_COMPILER stands in for the compiler
where what is checked is the build's bookkeeping, not its code.
"""
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pmrl_kernels import extension_build

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
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


# A compiler that writes empty outputs at once (and asks the real one for its version): the build runs every step,
# and the module it links does not load.
FAKE_COMPILER = """#!{python}
import os, sys
args = sys.argv[1:]
if "-o" not in args:
    os.execvp("c++", ["c++"] + args)
open(args[args.index("-o") + 1], "wb").close()
if "-MF" in args:
    open(args[args.index("-MF") + 1], "w").write(args[args.index("-o") + 1] + ":\\n")
"""


def fake_compiler(tmp_path: Path) -> str:
    path = tmp_path / "fake-c++"
    path.write_text(FAKE_COMPILER.format(python=sys.executable))
    path.chmod(0o755)
    return str(path)


def skip_unless_required(message: str) -> None:
    """Skip, or fail where CI requires the extension built at install (PMRL_REQUIRE_EXTENSION=1)."""
    if os.environ.get("PMRL_REQUIRE_EXTENSION") == "1":
        pytest.fail(message)
    pytest.skip(message)


def says_why_not_the_installed_build(line: str) -> bool:
    """Whether `line` says why the package's own build is not used: there is none, it is hidden (HIDE_INSTALLED) or
    its build key is not its sources'."""
    own = f"{ROOT / 'pmrl_kernels'}/_C"
    return "pmrl_kernels._C is not installed" in line or (
        own in line and ("hidden by the test" in line or "has build key" in line))


def cpu_sources() -> list[Path]:
    return sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))


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
    print("origin", extension.origin())
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


def test_build_key_follows_what_decides_the_binary(tmp_path, monkeypatch):
    """Equal for the same sources wherever they sit; changed by any source or header (a new one included), by CUDA,
    the compiler and the torch version; not by the C++ self-checks, which are not part of the extension."""
    copies = [tmp_path / name / "csrc" for name in ("a", "b")]
    for copy in copies:
        shutil.copytree(ROOT / "csrc", copy)
    root = copies[0]
    key = extension_build.build_key(root, False)
    assert extension_build.build_key(copies[1], False) == key
    (root / "tests" / "test_header_maths.cpp").write_text("int main() {}\n")
    assert extension_build.build_key(root, False) == key
    assert extension_build.build_key(root, True) != key
    for edited in ("bindings.cpp", "cpu/kernels.h", "include/pmrl/eigen.h", "cuda/gram_eig_forward.cuh",
                   "include/pmrl/new.h"):
        path = root / edited
        original = path.read_bytes() if path.exists() else None
        path.write_bytes((original or b"") + b"\n// edited\n")
        assert extension_build.build_key(root, False) != key, edited
        path.write_bytes(original) if original is not None else path.unlink()
        assert extension_build.build_key(root, False) == key, edited
    monkeypatch.setenv("CXX", "clang++-that-is-not-c++")
    assert extension_build.build_key(root, False) != key
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert extension_build.build_key(root, False) != key


def test_a_cached_module_is_found_by_its_key_only(tmp_path, monkeypatch):
    """A cache folder serves its module only under its own key, and only once its build record says it is complete."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = extension_build.first_use_directory("0123456789abcdef")
    directory.mkdir(parents=True)
    (directory / "m.so").write_bytes(b"")
    assert extension_build.cached_module("0123456789abcdef") is None  # no record: an unfinished build
    record = {"key": "0123456789abcdef", "module": "m.so"}
    extension_build.write_record(directory / extension_build.BUILD_RECORD, record)
    assert extension_build.cached_module("0123456789abcdef") == directory / "m.so"
    assert extension_build.cached_module("fedcba9876543210") is None
    (directory / "m.so").unlink()
    assert extension_build.cached_module("0123456789abcdef") is None


def test_a_compile_says_so_first_then_its_progress(tmp_path):
    """One line before anything compiles, then files done of total; a build whose module does not load is not
    kept, so the next process compiles again (and says so) instead of loading it."""
    environ = dict(CXX=fake_compiler(tmp_path), PMRL_SKIP_CUDA="1")
    cache = tmp_path / "cache"
    for _ in range(2):
        result = run_python(CHECK_LOSS, cache, **environ)
        lines = [line for line in result.stderr.splitlines() if line.startswith("pmrl_kernels: ")]
        total = len(cpu_sources())
        assert lines[0].startswith(f"pmrl_kernels: compiling the C++ extension ({total} files) once for the sources "
                                   f"{ROOT / 'csrc'}"), result.stderr
        assert f"into {cache / 'pmrl_kernels_C_'}" in lines[0]
        assert says_why_not_the_installed_build(lines[0])
        assert lines[1] == f"pmrl_kernels: compiled {total} of {total} files", result.stderr
        assert "first-use build failed" in result.stdout
        assert not list(cache.rglob(extension_build.BUILD_RECORD))


def test_the_build_inside_the_package_loads_without_a_word(compiled_extension):
    """The build setup.py put inside the package (with the key of its sources) loads silently, and origin() names
    it. CI installs with --no-build-isolation (PMRL_REQUIRE_EXTENSION=1), so there the loaded extension must be
    that build; elsewhere the package's build may be older than its sources."""
    from pmrl_kernels.ops import extension

    if compiled_extension.__name__ != extension_build.MODULE:
        skip_unless_required(f"the extension in use is not the package's own build but the {extension.origin()}")
    code = "from pmrl_kernels.ops import extension; extension.load(); print(extension.origin())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"installed build {compiled_extension.__file__}"
    assert "pmrl_kernels:" not in result.stderr


def test_checkout_beside_an_installed_build(tmp_path, monkeypatch):
    """The package imported from a checkout, while an installed distribution elsewhere holds a build: used when
    its build record has the key of the checkout's sources (and it says so) or when it has no record, passed over
    with the reason when its key is another."""
    built = [p for p in (ROOT / "pmrl_kernels").glob("_C.*") if p.name != extension_build.INSTALLED_RECORD]
    if not built:
        skip_unless_required("setup.py built no extension inside the package to install elsewhere")
    site = tmp_path / "site"
    (site / "pmrl_kernels").mkdir(parents=True)
    installed = site / "pmrl_kernels" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    shutil.copyfile(built[0], installed)
    info = site / "pmrl_kernels-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pmrl_kernels\nVersion: 0.1.0\n")
    (info / "RECORD").write_text(f"pmrl_kernels/{installed.name},,\n")
    environ = dict(PYTHONPATH=str(site), CXX=fake_compiler(tmp_path), PMRL_SKIP_CUDA="1")
    record = installed.with_name(extension_build.INSTALLED_RECORD)
    monkeypatch.setenv("CXX", environ["CXX"])  # the compiler is part of the key
    key = extension_build.build_key(ROOT / "csrc", False)

    record.write_text(json.dumps({"key": key, **extension_build.build_config(False)}))
    used = run_python(CHECK_LOSS, tmp_path / "cache", **environ)
    assert f"origin installed build {installed}" in used.stdout and "load_error None" in used.stdout
    assert f"the C++ extension is the installed build {installed}, which has the build key" in used.stderr
    assert "compiling" not in used.stderr

    # built with another compiler than this process's environment names: the record's compiler is the install's
    other = {**extension_build.build_config(False), "cxx": "another-c++"}
    record.write_text(json.dumps({"key": extension_build.build_key(ROOT / "csrc", False, other), **other}))
    elsewhere = run_python(CHECK_LOSS, tmp_path / "cache", **environ)
    assert f"origin installed build {installed}" in elsewhere.stdout and "compiling" not in elsewhere.stderr

    record.unlink()  # a build from before build records, or by hand: nothing says it is stale
    unrecorded = run_python(CHECK_LOSS, tmp_path / "cache", **environ)
    assert f"origin installed build {installed}" in unrecorded.stdout and "compiling" not in unrecorded.stderr
    assert f"the C++ extension is the installed build {installed}, which has no build record" in unrecorded.stderr

    record.write_text(json.dumps({"key": "0" * 16, **extension_build.build_config(False)}))
    passed_over = run_python(CHECK_LOSS, tmp_path / "cache", **environ)
    compile_line = next(line for line in passed_over.stderr.splitlines() if "compiling the C++ extension" in line)
    compiled_key = re.search(r"\(build key (\w+)\)", compile_line).group(1)
    assert f"{installed} has build key {'0' * 16}, the sources {ROOT / 'csrc'} make {compiled_key}" in compile_line


def test_an_installed_build_without_sources_to_check_is_used():
    """An install that ships no csrc/ cannot compare its build record with anything: its build is used as it is,
    not passed over for a first-use build that has no sources either. In a child process: this one may hold a
    first-use build of edited sources, whose ops the package's build would register a second time."""
    built = [p for p in (ROOT / "pmrl_kernels").glob("_C.*") if p.name != extension_build.INSTALLED_RECORD]
    if not built:
        skip_unless_required("setup.py built no extension inside the package")
    record = built[0].with_name(extension_build.INSTALLED_RECORD)
    if extension_build.read_record(record) is None:
        skip_unless_required("the package's build has no build record")
    code = ("from pathlib import Path\nfrom pmrl_kernels.ops import extension\n"
            f"module, why_not = extension._try_installed(Path({str(built[0])!r}), None)\n"
            "print('used', module is not None, why_not)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "used True None" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_first_use_build_compiles_once_then_loads_from_the_cache(tmp_path):
    """The path a plain `pip install .` takes: compiled once, then loaded by every later process, which says where
    from."""
    first = run_python(CHECK_LOSS, tmp_path)
    assert "'cpp'" in first.stdout and "load_error None" in first.stdout
    assert "compiling the C++ extension" in first.stderr and "ready, compiled in" in first.stderr
    (record,) = tmp_path.glob(f"*/{extension_build.BUILD_RECORD}")
    module = record.parent / json.loads(record.read_text())["module"]
    again = run_python(CHECK_LOSS, tmp_path)
    assert "'cpp'" in again.stdout and "compiling" not in again.stderr
    (line,) = [line for line in again.stderr.splitlines() if line.startswith("pmrl_kernels: ")]
    assert line.startswith(f"pmrl_kernels: the C++ extension is the first-use build {module} (")
    assert says_why_not_the_installed_build(line)
    assert f"origin first-use cache {module}" in again.stdout


def test_install_build_says_so_and_records_its_key(tmp_path, monkeypatch):
    """setup.py's build of the extension prints one line first, and writes beside the module the build record whose
    key first use compares with the sources' (here with FAKE_COMPILER: the bookkeeping, not the code)."""
    compiler = fake_compiler(tmp_path)
    environ = {k: v for k, v in os.environ.items() if k != "PMRL_SKIP_EXTENSION"}
    environ.update(CC=compiler, CXX=compiler, LDSHARED=f"{compiler} -shared", PMRL_SKIP_CUDA="1")
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                             "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=environ, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setenv("CXX", compiler)
    key = extension_build.build_key(ROOT / "csrc", False)
    assert (f"pmrl_kernels: compiling the C++ extension ({len(cpu_sources())} files, without CUDA kernels), build "
            f"key {key}") in result.stderr.splitlines(), result.stderr
    package = tmp_path / "lib" / "pmrl_kernels"
    (module,) = [p for p in package.glob("_C.*") if p.name != extension_build.INSTALLED_RECORD]
    record = json.loads(module.with_name(extension_build.INSTALLED_RECORD).read_text())
    assert (record["key"], record["module"], record["with_cuda"]) == (key, module.name, False)


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
