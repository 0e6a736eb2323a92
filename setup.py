"""Build: the package, its C++ sources, and the extension `pmrl_kernels._C` when torch is importable here.

pyproject.toml does not ask pip for torch, so an isolated build (plain `pip install .`) never downloads one: it
installs the Python package with the C++ sources inside it, and the extension is compiled on the first call that
needs it (pmrl_kernels.ops.extension). With `--no-build-isolation` this build sees the torch already installed and
compiles the extension now, against it, and records its build key beside it (first use loads it when the key is
that of the sources at hand). Sources, flags and environment knobs: pmrl_kernels/extension_build.py.
"""
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_recipe():
    # by path: importing the package would import torch, which this build may not have
    path = os.path.join(ROOT, "pmrl_kernels", "extension_build.py")
    spec = importlib.util.spec_from_file_location("pmrl_extension_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _load_build_recipe()


class BuildPyWithSources(build_py):
    """Also install csrc/ as pmrl_kernels/csrc, the sources of the first-use build."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "pmrl_kernels", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), target, ignore=shutil.ignore_patterns("tests"))


def _extensions():
    if recipe.skipped():
        return []
    if importlib.util.find_spec("torch") is None:
        print("pmrl_kernels: torch is not importable in this build environment (pip's build isolation); the C++ "
              "extension will be compiled on first use")
        return []
    from torch.utils import cpp_extension

    root = recipe.source_root()
    with_cuda, why_not = recipe.cuda_plan()
    if why_not and recipe.sources(root, True) != recipe.sources(root, False):
        warnings.warn(f"pmrl_kernels: building the CPU extension only ({why_not})")
    recipe.set_build_defaults(with_cuda)
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    RECORD.update(key=recipe.build_key(root, with_cuda), sources=str(root), **recipe.build_config(with_cuda))
    return [kind(
        recipe.MODULE,
        [os.path.relpath(s, ROOT) for s in recipe.sources(root, with_cuda)],
        include_dirs=[str(root / "include")],
        define_macros=[(recipe.CUDA_MACRO, "1")] if with_cuda else [],
        extra_compile_args={"cxx": recipe.cxx_flags(), "nvcc": recipe.NVCC_FLAGS} if with_cuda else recipe.cxx_flags(),
    )]


RECORD = {}  # what the extension is built from, filled by _extensions
ext_modules = _extensions()
cmdclass = {"build_py": BuildPyWithSources}
if ext_modules:
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionWithRecord(BuildExtension.with_options(use_ninja=True)):
        """Also write the build record beside the module: first use reads its key to tell whether this build is
        the one its sources make (pmrl_kernels.ops.extension)."""

        def run(self):
            module = Path(self.get_ext_fullpath(recipe.MODULE))
            record = module.with_name(recipe.INSTALLED_RECORD)
            if (recipe.read_record(record) or {}).get("key") != RECORD["key"]:
                # a module already there is built from other inputs (a header, a flag, another torch), which the
                # timestamps setuptools compares cannot tell
                self.force = True
            print(f"pmrl_kernels: compiling the C++ extension ({len(self.extensions[0].sources)} files, "
                  f"{'with' if RECORD['with_cuda'] else 'without'} CUDA kernels), build key {RECORD['key']}",
                  file=sys.stderr, flush=True)
            super().run()
            recipe.write_record(record, dict(RECORD, module=module.name))

    cmdclass["build_ext"] = BuildExtensionWithRecord
setup(ext_modules=ext_modules, cmdclass=cmdclass)
