"""What a launched interpreter sees, printed for ``tests/test_preload.py`` to compare a preloaded
launch with a fresh one: ``launch_probe.py MODE`` (MODE: ok, exit3, raise, rank1_fails)."""

import atexit
import json
import os
import sys
import time

mode = sys.argv[1]
atexit.register(lambda: print("atexit ran", flush=True))
info = {
    "argv": sys.argv[1:],
    "name": __name__,
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "probe": os.environ.get("PROBE"),
    **{k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")},
    "elastic": "TORCHELASTIC_RUN_ID" in os.environ,
}
if "RANK" in os.environ and mode == "ok":  # a real process group over what torchrun set
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    info["sum"] = t.item()
    dist.destroy_process_group()
print(json.dumps(info, sort_keys=True))
print(f"stderr of rank {os.environ.get('RANK')}", file=sys.stderr)
if mode == "exit3":
    sys.exit(3)
if mode == "raise":
    raise ValueError("probe failure")
if mode == "rank1_fails":
    if os.environ.get("RANK") == "1":
        sys.exit(5)
    time.sleep(120)  # torchrun stops this rank when rank 1 fails
