"""A description of the machine a benchmark ran on, for its JSON results."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import jax


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    devices = jax.devices()
    description = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
        # Other work on the machine inflates times; record how busy it was.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        description["torch"] = torch.__version__
        description["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return description
