"""Where and what ran: the device's name, the commit, the versions, written on every row."""
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
    root = Path(__file__).resolve().parents[2]  # the checkout holding pmrl_kernels/bench/
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def version_of(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(device: torch.device, timer: Timer) -> dict:
    """The run's fields of every row."""
    return {
        "device": device_name(device), "device_type": device.type, "copy_gbps": timer.copy_gbps(),
        "memory_method": timer.memory_method, "timer": timer.timer, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "torch": torch.__version__, "triton": version_of("triton"), "python": platform.python_version(),
        "commit": git_commit(),
    }
