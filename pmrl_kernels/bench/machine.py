"""Where and what ran: the device's name, its load, the commit, the versions, written on every row."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .timing import Timer


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs)"


def git_commit() -> Optional[str]:
    """HEAD of the checkout holding this package ("-dirty": uncommitted changes), or None when it is installed
    from a wheel or git is missing."""
    root = Path(__file__).resolve().parents[2]
    git = ["git", "-c", f"safe.directory={root}"]  # a checkout owned by another user is still read
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.split()
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    if len(top) != 2 or Path(top[0]).resolve() != root:  # site-packages inside some other repository
        return None
    return top[1] + ("-dirty" if dirty.stdout.strip() else "")


def loaded(device_type: str, load_avg: float) -> bool:
    """Whether other work competes for the CPU: it preempts torch's OpenMP threads, and times grow erratically,
    up to 100x."""
    return device_type == "cpu" and load_avg > 0.5 * (os.cpu_count() or 1)


def version_of(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(device: torch.device, timer: Timer) -> dict:
    """The run's fields of every row."""
    load_avg = os.getloadavg()[0]
    return {
        "device": device_name(device), "device_type": device.type, "copy_gbps": timer.copy_gbps(),
        "memory_method": timer.memory_method, "timer": timer.timer, "threads": torch.get_num_threads(),
        "load_avg": load_avg, "loaded": loaded(device.type, load_avg),
        "torch": torch.__version__, "triton": version_of("triton"), "python": platform.python_version(),
        "commit": git_commit(), "version": version_of("pmrl_kernels"),
    }
