"""pytest-benchmark cases: the providers x targets x modes of `python -m pmrl_kernels.bench`, built by the same code.

On demand, not part of the test suite (pyproject's testpaths is tests/):

    python -m pytest benchmarks/ --benchmark-only [--benchmark-json out.json]
    PMRL_BENCH_SIZES="B=1024,16384;M=4;D=256" PMRL_BENCH_DTYPE=bfloat16 python -m pytest benchmarks/ -k align

Defaults: the reference case B=16384, M=4, D=256, float32, on CUDA when present. A case over the memory
budget of the bench (a third of free RAM, 90% of free GPU memory) is skipped, as the bench reports "OOM-skip".
"""
import functools
import itertools
import os

import pytest
import torch

from pmrl_kernels.backends import available_backends
from pmrl_kernels.bench import cells, cli, machine, providers, sweep, targets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = cli.parse_sizes(os.environ.get("PMRL_BENCH_SIZES", ""), {"B": [16384], "M": [4], "D": [256]})
DTYPE = os.environ.get("PMRL_BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("PMRL_BENCH_ROUNDS", "10"))
if DTYPE not in cells.DTYPES:
    raise ValueError(f"PMRL_BENCH_DTYPE must be one of {list(cells.DTYPES)}, got {DTYPE!r}")
CASES = sweep.build_cases(
    [(DTYPE, b, m, d) for b, m, d in itertools.product(SIZES["B"], SIZES["M"], SIZES["D"])],
    list(targets.TARGETS), cells.MODES, list(providers.BASE_PROVIDERS) + available_backends(DEVICE.type),
    DEVICE.type,
)


@functools.lru_cache(maxsize=1)  # cases run size by size: keep only the current size's inputs
def _inputs(dtype, b, m, d):
    return cells.make_inputs(dtype, b, m, d, DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.target}-{c.mode}-{c.provider}-{c.precision}-{c.dtype}-B{c.B}-M{c.M}-D{c.D}"
)
def test_pmrl(benchmark, case):
    try:
        setup, fn = sweep.prepare(case, _inputs(case.dtype, case.B, case.M, case.D), sweep.memory_budget(DEVICE))
    except cells.Skip as skip:
        pytest.skip(f"{skip.args[0]}: {skip.args[1]}")

    def timed_setup():
        arg = setup()
        _sync()  # pytest-benchmark times on the host: start with the device idle, end when it is done
        return (arg,), {}

    def timed(arg):
        fn(arg)
        _sync()

    benchmark.group = f"{case.target}-{case.mode}-{case.precision}-{case.dtype}-B{case.B}-M{case.M}-D{case.D}"
    benchmark.extra_info.update(provider=case.provider, device=machine.device_name(DEVICE), torch=torch.__version__)
    benchmark.pedantic(timed, setup=timed_setup, rounds=ROUNDS, warmup_rounds=1)
