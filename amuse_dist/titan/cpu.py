"""Make torchtitan 0.2.2's real Trainer run on a CUDA-less machine (gloo).

Three things break on CPU (see docs/usage.md, "Running on CPU"): the device type is frozen to "cuda"
at import, FSDP's PREMUL_SUM reduction is missing on gloo, and DTensor init on a CPU mesh gives
every rank the same shard. This module fixes the first here; the other two are applied by the
train spec (``parallelize`` and ``AmuseTransformer.init_weights``) when ``on_cpu()`` is true.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
import warnings
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

_CPU: bool | None = None


def on_cpu() -> bool:
    """True when training runs on CPU (no CUDA, or AMUSE_DEVICE=cpu forces it)."""
    global _CPU
    if _CPU is None:
        _CPU = os.environ.get("AMUSE_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available()
    return _CPU


class _Props:
    def __init__(self, total_memory: int) -> None:
        self.total_memory = total_memory
        self.name = "cpu"


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


class CpuDeviceModule:
    """The subset of ``torch.cuda``'s API torchtitan calls, answered for the CPU."""

    def __getattr__(self, name: str) -> Any:  # anything else: torch.cpu's version
        return getattr(torch.cpu, name)

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> _Props:
        return _Props(_total_memory())

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        """Peak resident set size of this process stands in for CUDA's peak allocations."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def set_device(device: Any = None) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1


def setup_device() -> str:
    """Fix torchtitan's device type before it is imported; returns "cpu" or "cuda".

    Must run before the first ``import torchtitan`` (modules copy ``device_type`` at import).
    """
    if not on_cpu():
        return "cuda"
    if "torchtitan.tools.utils" in sys.modules:
        utils = sys.modules["torchtitan.tools.utils"]
        if utils.device_type != "cpu":
            raise RuntimeError(
                "torchtitan was imported before amuse_dist.titan.cpu.setup_device(); "
                "call setup_device() first (entry point: python -m amuse_dist.train)"
            )
        return "cpu"
    import torch._utils as tu

    orig_type, orig_module = tu._get_available_device_type, tu._get_device_module
    tu._get_available_device_type = lambda: "cpu"
    tu._get_device_module = lambda device_type=None: CpuDeviceModule()
    try:
        import torchtitan.tools.utils as utils  # noqa: F401  (binds device_type/device_module)
    finally:
        tu._get_available_device_type, tu._get_device_module = orig_type, orig_module
    assert utils.device_type == "cpu"
    return "cpu"


def force_sum_reduction(model: torch.nn.Module) -> None:
    """Gloo has no PREMUL_SUM; torchtitan's loss is already divided by global tokens, so a
    plain sum reduction of gradients is exactly what it wants."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)


# torchtitan/torch messages that are expected and say nothing actionable: (regex, CPU only?)
_NOISY_LOGS = (
    # the local corpus builds the tokenizer folder after the config is parsed; train.py warns
    # itself when a non-local dataset's tokenizer folder is missing
    (r"HF assets path .* does not exist", False),
    # torchtitan's HF checkpoint writer: amuse_dist exports through its own writer (export.py)
    (r"model\.safetensors\.index\.json not found at hf_assets_path", False),
    (r"ENV\[TORCH_NCCL_ASYNC_ERROR_HANDLING\]", True),  # NCCL setting, no NCCL on CPU
    (r"Error running lspci", True),  # GPU detection
    (r"Peak flops undefined for: cpu", True),  # MFU assumes a GPU; explained once instead
)
_NOISY_WARNINGS = (
    # DTensor has no RNG tracker on CPU meshes: amuse_dist initialises the full model from one
    # seed and loads each rank's shard (model.AmuseTransformer.init_weights)
    (r"DTensor random operators may not have complete support on cpu", True),
    (r"DTensor manual_seed\(\) may not have complete support on cpu", True),
    # the same init casts a throwaway model (with its complex RoPE table) to the param dtype;
    # init_weights rebuilds that table right after, and it is not part of the state dict
    (r"Casting complex values to real discards the imaginary part", True),
    (r"Set timeout is now only supported for either nccl or gloo", True),
    (r"'set_vital' is deprecated", False),  # torchdata calls a deprecated torch API
)
CPU_NOTE = (
    "CPU run (gloo): the tflops/mfu figures assume an A100 peak and mean nothing here; "
    "expected CPU-mesh warnings are silenced (see docs/usage.md, 'Warnings')"
)


class _DropNoise(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Silence the warnings and log lines listed above (once per process, idempotent).

    On CPU, one info line explains what was silenced and that MFU is meaningless.
    """
    cpu = on_cpu()
    root = logging.getLogger()
    if any(isinstance(f, _DropNoise) for f in root.filters):
        return
    root.addFilter(_DropNoise([p for p, cpu_only in _NOISY_LOGS if cpu or not cpu_only]))
    for pattern, cpu_only in _NOISY_WARNINGS:
        if cpu or not cpu_only:
            warnings.filterwarnings("ignore", message=pattern)
    if cpu and int(os.environ.get("RANK", "0")) == 0:
        root.info(CPU_NOTE)
