"""Export weights (X for AMUSE) as a Hugging Face Llama folder: safetensors, config.json, tokenizer.

Written by every rank through DCP's ``HuggingFaceStorageWriter`` (each rank writes its own shards,
then they are consolidated), into ``<dest>.tmp`` first; the folder appears under its final name only
when complete (``amuse_export.json`` inside is written last). A crash mid-export leaves at most a
``.tmp`` folder, which the next export replaces, and never touches an earlier export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from amuse_dist.titan.run_format import (
    EXPORT_MARKER,
    TOKENIZER_FILES,
    ExportError,
    ExportInfo,
    is_complete_export,
    publish,
)

__all__ = ["EXPORT_MARKER", "export_hf", "hf_llama_config", "is_complete_export", "load_hf_export"]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def hf_llama_config(model_args: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """config.json for ``transformers.LlamaForCausalLM`` matching a torchtitan llama3 model."""
    n_heads = model_args.n_heads
    n_kv = model_args.n_kv_heads or n_heads
    rope = model_args.rope_scaling_args
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model_args.dim,
        "intermediate_size": int(state_dict["layers.0.feed_forward.w1.weight"].shape[0]),
        "num_hidden_layers": model_args.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": model_args.dim // n_heads,
        "hidden_act": "silu",
        "rms_norm_eps": model_args.norm_eps,
        "rope_theta": model_args.rope_theta,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": rope.scaling_factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
        # transformers expects at least the RoPE scaling's original context
        "max_position_embeddings": max(
            model_args.max_seq_len, rope.original_max_position_embeddings
        ),
        "vocab_size": model_args.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def export_hf(
    dest: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    sd_adapter: Any,
    model_args: Any,
    tokenizer_dir: str | os.PathLike[str] | None,
    info: ExportInfo,
) -> Path:
    """Write ``state_dict`` (torchtitan names, plain or DTensor) as an HF Llama folder at ``dest``.

    A collective: every rank calls it with its own shards.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    config = hf_llama_config(model_args, state_dict)
    hf_sd = sd_adapter.to_hf(_permutable(state_dict, model_args))
    writer = HuggingFaceStorageWriter(
        path=str(tmp), save_distributed=True, enable_consolidation=True
    )
    dcp.save(hf_sd, storage_writer=writer)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(tmp / "sharded", ignore_errors=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        info.write(tmp)  # the marker, last
        publish(tmp, dest)
    _barrier()
    return dest


def _permutable(state_dict: dict[str, torch.Tensor], model_args: Any) -> dict[str, torch.Tensor]:
    """Gather the q/k projections whose heads do not split evenly over the shards.

    The HF layout permutes rows within each head; a DTensor can only be viewed per head when
    every shard holds whole heads. Everything else stays sharded for the distributed writer.
    """
    from torch.distributed.tensor import DTensor

    heads = {"attention.wq.weight": model_args.n_heads}
    heads["attention.wk.weight"] = model_args.n_kv_heads or model_args.n_heads
    out = dict(state_dict)
    for key, value in state_dict.items():
        n = next((h for suffix, h in heads.items() if key.endswith(suffix)), None)
        if n is not None and isinstance(value, DTensor) and n % value.device_mesh.size() != 0:
            out[key] = value.full_tensor()
    return out


def load_hf_export(path: str | os.PathLike[str], sd_adapter: Any) -> dict[str, torch.Tensor]:
    """Read an export back into torchtitan names (plain tensors)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not is_complete_export(p):
        raise ExportError(
            f"{p} is not a complete X export (expected *.safetensors and {EXPORT_MARKER})"
        )
    hf_sd: dict[str, torch.Tensor] = {}
    for f in sorted(p.glob("*.safetensors")):
        try:
            hf_sd.update(load_file(f))
        except Exception as e:  # safetensors' own message names no file
            raise ExportError(
                f"{f}: unreadable safetensors file, truncated or corrupt "
                f"({type(e).__name__}: {e}); evaluate its checkpoint's DCP state instead: "
                f"amuse-eval {p.parent} --source dcp"
            ) from e
    try:
        return sd_adapter.from_hf(hf_sd)
    except Exception as e:
        raise ExportError(
            f"{p}: its tensors do not fit this model's layout ({type(e).__name__}: {e}); was it "
            "exported from another model? check --config / the export's config.json"
        ) from e
