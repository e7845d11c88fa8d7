"""torchtitan's Trainer with the hooks AMUSE runs need (import after ``cpu.setup_device()``)."""

import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchtitan.distributed import ParallelDims
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from amuse_dist.titan import train_spec
from amuse_dist.titan.config import LOCAL_DATASETS


class AmuseTrainer(Trainer):
    """Adds: whole-config access for the optimizer builder, and the offline corpus/tokenizer
    (built once by rank 0 after the process group exists, before dataloaders are built)."""

    def __init__(self, job_config: Any) -> None:
        train_spec.set_job_config(job_config)
        train_spec.register()
        super().__init__(job_config)

    def init_distributed(self) -> ParallelDims:
        parallel_dims = super().init_distributed()
        self._prepare_local_data()
        return parallel_dims

    def _prepare_local_data(self) -> None:
        cfg = self.job_config
        train_local = cfg.training.dataset in LOCAL_DATASETS
        val_local = cfg.validation.enable and cfg.validation.dataset in LOCAL_DATASETS
        from amuse_dist.titan import data

        data.register_datasets()  # every rank: the registry is per process
        if not (train_local or val_local):
            return

        assets = cfg.local_data.assets_dir
        paths: list[Any] = [None, None]
        if dist.get_rank() == 0:
            paths = [str(p) for p in data.prepare_assets(assets, cfg.local_data.vocab_size)]
        dist.broadcast_object_list(paths, src=0)  # others wait here until rank 0 has built them
        corpus_dir, tokenizer_dir = paths
        if train_local:
            cfg.training.dataset_path = str(corpus_dir)
        if val_local:
            cfg.validation.dataset_path = str(corpus_dir)
        cfg.model.hf_assets_path = str(tokenizer_dir)
        logger.info(f"local corpus at {corpus_dir}, tokenizer at {tokenizer_dir}")


def dump_full_state(trainer: Trainer, path: str) -> None:
    """Write the full (unsharded) model state dict from rank 0: used to check that init does
    not depend on the world size."""
    sd = get_model_state_dict(
        trainer.model_parts[0], options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({k: v.clone() for k, v in sd.items()}, path)
    dist.barrier()
