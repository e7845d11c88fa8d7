"""What a launched interpreter sees, printed for ``tests/test_preload.py`` to compare a preloaded
launch with a fresh one: ``launch_probe.py MODE`` (MODE: ok, exit3, raise, rank1_fails, sleep)."""

import atexit
import json
import logging
import os
import sys
import threading
import time

import torch
import transformers  # noqa: F401  # as the trainer imports it (it configures its logger)

mode = sys.argv[1]
atexit.register(lambda: print("atexit ran", flush=True))
TORCHRUN_ENV = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "OMP_NUM_THREADS",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
)
info = {
    "argv": sys.argv,
    "name": __name__,
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "probe": os.environ.get("PROBE"),
    **{k: os.environ.get(k) for k in TORCHRUN_ENV},
    "elastic": "TORCHELASTIC_RUN_ID" in os.environ,
}
if "RANK" in os.environ and mode == "ok":  # a real process group over what torchrun set
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    info["sum"] = t.item()
    dist.destroy_process_group()
print(json.dumps(info, sort_keys=True))
print(f"seed {torch.initial_seed()}", file=sys.stderr)  # differs launch to launch
# the libraries' own loggers write where a fresh interpreter's would (stderr)
logging.getLogger("torch.distributed").warning("probe: torch.distributed logger")
logging.getLogger("transformers").warning("probe: transformers logger")
print(f"stderr of rank {os.environ.get('RANK')}", file=sys.stderr)
threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined", flush=True))).start()
if mode == "exit3":
    sys.exit(3)
if mode == "raise":
    raise ValueError("probe failure")
if mode == "rank1_fails":
    if os.environ.get("RANK") == "1":
        sys.exit(5)
    time.sleep(120)  # torchrun stops this rank when rank 1 fails
if mode == "sleep":
    with open(os.environ["PROBE_PID_FILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(120)
