"""Export weights (X for AMUSE) as a complete Hugging Face Llama folder.

The folder loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and nothing else: safetensors,
config.json (transformers' ``LlamaConfig``: special token ids, the trained context as
``max_position_embeddings``, llama3 RoPE, tied embeddings), generation_config.json, the training
tokenizer (adding BOS as training did) and a README.md model card.

Written by every rank through DCP's ``HuggingFaceStorageWriter`` (each rank writes its own shards,
then they are consolidated), into ``<dest>.tmp`` first; the folder appears under its final name only
when complete (``amuse_export.json`` inside is written last). A crash mid-export leaves at most a
``.tmp`` folder, which the next export replaces, and never touches an earlier export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

from amuse_dist.anytime.run_format import (
    EXPORT_MARKER,
    TOKENIZER_FILES,
    ExportError,
    ExportInfo,
    is_complete_export,
    publish,
)
from amuse_dist.titan.dist_util import barrier as _barrier
from amuse_dist.titan.dist_util import rank as _rank

__all__ = ["EXPORT_MARKER", "export_hf", "hf_llama_config", "is_complete_export", "load_hf_export"]


def llama3_rope_parameters(rope: Any, theta: float, max_position_embeddings: int) -> dict[str, Any]:
    """torchtitan's llama3 RoPE scaling as transformers' ``rope_parameters``.

    transformers warns on every load when ``original_max_position_embeddings`` is not below
    ``max_position_embeddings``, which is the case for a model trained at a short context with
    Llama 3's 8192. The llama3 frequencies depend on (original, low_freq_factor,
    high_freq_factor) only through original/low, original/high and original/wavelen - low, so
    halving all three leaves every frequency unchanged, bit for bit (powers of two are exact).
    We halve until the original context is below ``max_position_embeddings``.
    """
    original = int(rope.original_max_position_embeddings)
    low, high = float(rope.low_freq_factor), float(rope.high_freq_factor)
    while original >= max_position_embeddings and original % 2 == 0 and original > 1:
        original, low, high = original // 2, low / 2, high / 2
    return {
        "rope_type": "llama3",
        "rope_theta": float(theta),
        "factor": float(rope.scaling_factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def is_tied(model_args: Any, state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the output head shares the token embedding (no separate ``output.weight``)."""
    if getattr(model_args, "tie_word_embeddings", False) or getattr(
        model_args, "tie_embeddings", False
    ):
        return True
    return "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict


def hf_llama_config(
    model_args: Any,
    state_dict: dict[str, torch.Tensor],
    *,
    max_position_embeddings: int | None = None,
    token_ids: dict[str, int | None] | None = None,
) -> Any:
    """transformers' ``LlamaConfig`` for a torchtitan llama3 model.

    ``max_position_embeddings`` defaults to the context the model was trained at
    (``model_args.max_seq_len``, i.e. ``training.seq_len``): tools such as lm-evaluation-harness
    take it as the longest input to feed the model.
    """
    from transformers import LlamaConfig

    n_heads = model_args.n_heads
    max_pos = int(max_position_embeddings or model_args.max_seq_len)
    ids = token_ids or {}
    rope = model_args.rope_scaling_args
    if rope is not None:
        rope_parameters = llama3_rope_parameters(rope, model_args.rope_theta, max_pos)
    else:
        rope_parameters = {"rope_type": "default", "rope_theta": float(model_args.rope_theta)}
    config = LlamaConfig(
        vocab_size=model_args.vocab_size,
        hidden_size=model_args.dim,
        intermediate_size=int(state_dict["layers.0.feed_forward.w1.weight"].shape[0]),
        num_hidden_layers=model_args.n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=model_args.n_kv_heads or n_heads,
        head_dim=model_args.dim // n_heads,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=model_args.norm_eps,
        rope_parameters=rope_parameters,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=is_tied(model_args, state_dict),
        bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"),
        pad_token_id=ids.get("pad"),
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def hf_generation_config(config: Any) -> Any:
    """Greedy decoding with the model's special tokens (no max_length: transformers warns when a
    caller's max_new_tokens meets one; the context limit is max_position_embeddings)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )


def special_token_ids(tokenizer_dir: str | os.PathLike[str] | None) -> dict[str, int | None]:
    """{"bos", "eos", "pad"} ids from a tokenizer folder (pad falls back to eos)."""
    ids: dict[str, int | None] = {"bos": None, "eos": None, "pad": None}
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        return ids
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    for key in ("bos", "eos", "pad"):
        name = _token_name(config.get(f"{key}_token"))
        if name is not None:
            ids[key] = tok.token_to_id(name)
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def export_tokenizer(
    src: str | os.PathLike[str], dst: Path, model_max_length: int
) -> dict[str, int | None]:
    """Copy the training tokenizer into ``dst`` so that ``AutoTokenizer`` tokenizes as training.

    torchtitan's text datasets always start a document with BOS (and end it with EOS). A Hugging
    Face tokenizer adds only what its ``tokenizer.json`` post-processor says, so when encoding
    does not start with BOS already, a post-processor that prepends it is added (EOS is not
    added, as for Llama: a prompt must not end the document). The pad token falls back to EOS.
    Returns the special token ids.
    """
    from tokenizers import Tokenizer, processors

    src = Path(src)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    if not (dst / "tokenizer.json").is_file():
        return {"bos": None, "eos": None, "pad": None}
    ids = special_token_ids(dst)
    config = _read_json(dst / "tokenizer_config.json")
    bos, bos_id = _token_name(config.get("bos_token")), ids["bos"]
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    if bos is not None and bos_id is not None and tok.encode("a").ids[:1] != [bos_id]:
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)],
        )
        old = tok.post_processor
        tok.post_processor = template if old is None else processors.Sequence([old, template])
        tok.save(str(dst / "tokenizer.json"))
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    config["add_bos_token"] = bos is not None
    config["add_eos_token"] = False
    if config.get("pad_token") is None and config.get("eos_token") is not None:
        config["pad_token"] = config["eos_token"]
    config["model_max_length"] = model_max_length
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids


def model_card(info: dict[str, Any], config: Any) -> str:
    """README.md for an export: what it is, how it was trained, and how to load it."""
    hp = info.get("hyperparameters") or {}
    val = info.get("validation") or {}
    weights = info.get("weights", "x")
    what = (
        "the averaged weights X of AMUSE / Schedule-Free (the anytime model)"
        if weights == "x"
        else "the training weights Y"
    )
    rows = [
        ("step", info.get("step")),
        ("tokens seen", f"{info['tokens_seen']:,}" if info.get("tokens_seen") is not None else "?"),
        ("weights", f"{weights.upper()}: {what}"),
        ("optimizer", info.get("optimizer")),
        ("model", f"{info.get('model', {}).get('name')} / {info.get('model', {}).get('flavor')}"),
        ("parameters", f"{info['n_params']:,}" if info.get("n_params") else "?"),
        ("trained context (seq_len)", config.max_position_embeddings),
    ]
    if val.get("loss") is not None:
        rows.append(
            (
                f"validation loss at {val.get('weights', weights).upper()}",
                f"{val['loss']:.4f} (step {val.get('step')}, {val.get('batches')} batches of "
                f"{val.get('dataset')})",
            )
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    hp_rows = "\n".join(f"| {k} | {_fmt_value(v)} |" for k, v in sorted(hp.items()))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- amuse
- llama
- torchtitan
---

# {info.get("model", {}).get("name", "llama")} {info.get("model", {}).get("flavor", "")}, step {info.get("step")} ({weights.upper()})

Exported by amuse_dist from a torchtitan training run: {what}.

| | |
|---|---|
{table}

## Optimizer hyper-parameters

| name | value |
|---|---|
{hp_rows}

## Command

```bash
{info.get("command", "?")}
```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("PATH")  # adds BOS, as in training
model = AutoModelForCausalLM.from_pretrained("PATH")
out = model.generate(**tokenizer("def main():", return_tensors="pt"), max_new_tokens=32)
print(tokenizer.decode(out[0]))
```

Inputs longer than {config.max_position_embeddings} tokens (the trained context) are out of
distribution.
"""


def _fmt_value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def export_hf(
    dest: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    sd_adapter: Any,
    model_args: Any,
    tokenizer_dir: str | os.PathLike[str] | None,
    info: ExportInfo,
    max_position_embeddings: int | None = None,
) -> Path:
    """Write ``state_dict`` (torchtitan names, plain or DTensor) as a Hugging Face model folder.

    ``dest`` gets the safetensors, config.json (transformers' LlamaConfig),
    generation_config.json, the tokenizer (tokenizing as training did), a README.md model card
    built from ``info``, and ``amuse_export.json`` (``info``) last. A collective: every rank calls
    it with its own shards.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    hf_sd = sd_adapter.to_hf(_permutable(state_dict, model_args))
    writer = HuggingFaceStorageWriter(
        path=str(tmp), save_distributed=True, enable_consolidation=True
    )
    dcp.save(hf_sd, storage_writer=writer)
    _barrier()
    if _rank() == 0:
        shutil.rmtree(tmp / "sharded", ignore_errors=True)
        max_pos = int(max_position_embeddings or model_args.max_seq_len)
        ids = (
            export_tokenizer(tokenizer_dir, tmp, max_pos)
            if tokenizer_dir is not None
            else special_token_ids(None)
        )
        config = hf_llama_config(
            model_args, state_dict, max_position_embeddings=max_pos, token_ids=ids
        )
        config.save_pretrained(tmp)
        hf_generation_config(config).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(dataclasses.asdict(info), config))
        info.write(tmp)  # the marker, last
        publish(tmp, dest)
    _barrier()
    return dest


def _permutable(state_dict: dict[str, torch.Tensor], model_args: Any) -> dict[str, torch.Tensor]:
    """Gather the q/k projections whose heads do not split evenly over their row pieces.

    The HF layout permutes rows within each head; a DTensor can only be viewed per head when
    every piece holds whole heads. The pieces are counted over the mesh dims that split rows
    (FSDP's Shard(0), TP's colwise Shard(0), FSDP+TP's _StridedShard(0)); replicated dims (HSDP)
    do not split anything. Everything else stays sharded for the distributed writer.
    """
    from torch.distributed.tensor import DTensor

    heads = {"attention.wq.weight": model_args.n_heads}
    heads["attention.wk.weight"] = model_args.n_kv_heads or model_args.n_heads
    out = dict(state_dict)
    for key, value in state_dict.items():
        n = next((h for suffix, h in heads.items() if key.endswith(suffix)), None)
        if n is not None and isinstance(value, DTensor) and not _whole_heads(value, n):
            out[key] = value.full_tensor()
    return out


def _whole_heads(t: torch.Tensor, n_heads: int) -> bool:
    """True when every piece of DTensor ``t`` holds whole heads (rows split evenly by head)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return True
    pieces = row_pieces(tuple(t.device_mesh.shape), tuple(t.placements))
    return pieces is not None and n_heads % pieces == 0


def row_pieces(mesh_shape: tuple[int, ...], placements: tuple[Any, ...]) -> int | None:
    """Into how many pieces the placements cut a matrix's rows: the product of the mesh dims
    that shard dim 0 (Shard(0), _StridedShard(0)); None for a Partial placement."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    pieces = 1
    for size, placement in zip(mesh_shape, placements, strict=True):
        if isinstance(placement, (Shard, _StridedShard)):
            pieces *= size if placement.dim == 0 else 1
        elif not isinstance(placement, Replicate):
            return None
    return pieces


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
