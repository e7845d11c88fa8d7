"""``amuse_dist.train`` whose X export dies half-way at one step, as a kill -9 would leave it.

Usage (under torchrun): crash_export_worker.py CRASH_STEP <amuse-train args...>
"""

import os
import sys
from pathlib import Path

from amuse_dist.titan import launch

launch.setup_device()

import amuse_dist.titan.trainer as trainer_module  # noqa: E402
from amuse_dist.titan.run import train  # noqa: E402

CRASH_STEP = int(sys.argv.pop(1))
_real_export = trainer_module.export_hf


def _dying_export(dest: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
    info = args[-1]
    if info.step == CRASH_STEP:
        tmp = Path(dest).with_name(Path(dest).name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "model-00001-of-00001.safetensors").write_bytes(b"half a file")
        sys.stdout.flush()
        os._exit(9)
    return _real_export(dest, *args, **kwargs)


trainer_module.export_hf = _dying_export
train(sys.argv[1:])
