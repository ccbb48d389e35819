"""Safetensors checkpoint (single or sharded) -> the parameters of a meta-device CausalLM.

Tensors are read through safetensors' memory map one at a time and copied straight to the target
device and dtype, so a checkpoint is never held twice and the weights never follow the file afterwards.
q/k/v and gate/up load into row slices of the fused projections. Anything missing, unexpected or
misshapen is an error that names the tensor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from model.kv_heads import check_num_kv_heads, convert_kv_heads

# checkpoint projection -> (fused parameter, shard index)
FUSED_SHARDS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what was expected."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({model_dir / name for name in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map of "
                                  f"tensor -> file): {type(exc).__name__}: {exc}") from None
        outside = sorted({name for name in weight_map.values() if Path(name).name != name or name in ("", ".", "..")})
        if outside:  # shards are files of the model directory; a path would read weights from elsewhere
            raise CheckpointError(f"{index}: shard names must be file names in the model directory, got {outside}")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files listed but not found: {missing}")
        return files
    if (model_dir / "model.safetensors").is_file():  # alone, as transformers reads it: a directory may also
        return [model_dir / "model.safetensors"]      # hold consolidated.safetensors or an adapter's file
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES) if model_dir.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickles)}). They are refused because "
            "unpickling can execute arbitrary code. Convert them once to safetensors, e.g. "
            "`python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('IN')"
            ".save_pretrained('OUT', safe_serialization=True)\"`, then serve OUT.")
    raise CheckpointError(f"{model_dir}: no model.safetensors, sharded index or *.safetensors file found")


def _fused_slices(model: nn.Module) -> dict[str, list[tuple[int, int]]]:
    """For each fused parameter name, the row range (start, stop) of each of its shards."""
    slices = {}
    for name, module in model.named_modules():
        if hasattr(module, "qkv_proj"):
            sizes = module.split_sizes
        elif hasattr(module, "gate_up_proj"):
            half = module.gate_up_proj.out_features // 2
            sizes = (half, half)
        else:
            continue
        fused = "qkv_proj" if hasattr(module, "qkv_proj") else "gate_up_proj"
        bounds, start = [], 0
        for size in sizes:
            bounds.append((start, start + size))
            start += size
        for kind in ("weight", "bias"):
            slices[f"{name}.{fused}.{kind}"] = bounds
    return slices


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner_name), leaf, nn.Parameter(tensor, requires_grad=False))


def load_weights(model: nn.Module, model_dir: Path, *, dtype: torch.dtype, device: torch.device,
                 kv_head_method: str = "mean", progress: bool = False) -> None:
    config = model.config
    if config.num_kv_heads != config.num_key_value_heads:
        check_num_kv_heads(config.num_attention_heads, config.num_key_value_heads, config.num_kv_heads)
    params = dict(model.named_parameters())
    tied = config.tie_word_embeddings
    if tied:
        params.pop("lm_head.weight")
    fused = _fused_slices(model)
    fused = {k: v for k, v in fused.items() if k in params}
    pending = {name: set(range(len(fused[name]))) if name in fused else {0} for name in params}
    buffers: dict[str, torch.Tensor] = {}  # loaded values; fused ones filled shard by shard

    files, written_head = checkpoint_files(model_dir), None
    with tqdm(desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path in files:
            try:
                reader_context = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors' own error types vary by version; it checks
                # here that the header's offsets cover the file, so a truncated one fails here, not per tensor
                raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
            with reader_context as reader:
                bar.total = (bar.total or 0) + len(reader.keys())
                for ckpt_name in reader.keys():
                    bar.update()
                    if ckpt_name.endswith(IGNORED_SUFFIXES):
                        continue
                    if tied and ckpt_name == "lm_head.weight":  # kept aside: used only if it is not the embedding
                        written_head = reader.get_tensor(ckpt_name)
                        continue
                    tensor = reader.get_tensor(ckpt_name)
                    _load_one(ckpt_name, tensor, params, fused, pending, buffers, config, dtype, device,
                              kv_head_method)

    missing = [f"{name} (expected {tuple(params[name].shape)})" for name, left in pending.items() if left
               and name not in fused]
    missing += [f"{name} shard {i} (rows {fused[name][i]})" for name, left in pending.items() if left
                and name in fused for i in sorted(left)]
    if missing:
        raise CheckpointError(f"{model_dir}: tensors missing from the checkpoint: {', '.join(missing)}")
    for name, tensor in buffers.items():
        _set_parameter(model, name, tensor)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        _untie_a_different_head(model, written_head, model_dir)


def _untie_a_different_head(model: nn.Module, head: torch.Tensor | None, model_dir: Path) -> None:
    """tie_word_embeddings with an lm_head.weight in the checkpoint that is not the embedding: use the
    written head, as transformers does (its logits are what the checkpoint was trained or converted with)."""
    embedding = model.model.embed_tokens.weight
    if head is None:
        return
    if head.shape != embedding.shape:
        raise CheckpointError(f"{model_dir}: lm_head.weight {tuple(head.shape)} does not match the tied "
                              f"embedding {tuple(embedding.shape)}")
    loaded = head.to(device=embedding.device, dtype=embedding.dtype, copy=True)  # compared where it will live
    if torch.equal(loaded, embedding):
        return
    _check_finite("lm_head.weight", head, loaded)
    logger.warning("%s: config.json sets tie_word_embeddings, but the checkpoint's lm_head.weight differs from "
                   "the embedding; using the checkpoint's lm_head.weight, as transformers does", model_dir)
    model.lm_head.weight = nn.Parameter(loaded, requires_grad=False)


def _load_one(ckpt_name, tensor, params, fused, pending, buffers, config, dtype, device, kv_head_method):
    module_name, _, kind = ckpt_name.rpartition(".")
    owner, _, proj = module_name.rpartition(".")
    target, shard = ckpt_name, 0
    if proj in FUSED_SHARDS:
        fused_proj, shard = FUSED_SHARDS[proj]
        target = f"{owner}.{fused_proj}.{kind}"
    if target not in params:
        raise CheckpointError(f"unexpected tensor {ckpt_name} {tuple(tensor.shape)} in the checkpoint: "
                              "this model has no such parameter")
    if proj in ("k_proj", "v_proj"):
        written = config.num_key_value_heads * config.head_dim  # rows before pooling or replication
        if tensor.shape[0] != written:
            raise CheckpointError(f"tensor {ckpt_name}: checkpoint shape {tuple(tensor.shape)} but the checkpoint's "
                                  f"{config.num_key_value_heads} KV heads of {config.head_dim} need {written} rows "
                                  "(check config.json against the weights)")
        tensor = convert_kv_heads(tensor, config.num_key_value_heads, config.num_kv_heads, config.head_dim,
                                  kv_head_method)
    param = params[target]
    if target in fused:
        start, stop = fused[target][shard]
        expected = (stop - start, *param.shape[1:])
    else:
        expected = tuple(param.shape)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f"tensor {ckpt_name}: checkpoint shape {tuple(tensor.shape)} but the model "
                              f"expects {expected} (check config.json against the weights)")
    if shard not in pending[target]:
        raise CheckpointError(f"tensor {ckpt_name} appears twice in the checkpoint")
    pending[target].discard(shard)
    if target in fused:
        if target not in buffers:
            buffers[target] = torch.empty(param.shape, dtype=dtype, device=device)
        loaded = buffers[target][start:stop]
        loaded.copy_(tensor)  # converts device and dtype in the one copy
    else:
        # copy=True: a float32 -> float32 CPU load would otherwise keep safetensors' private file mapping, and
        # a checkpoint rewritten in place would then change (or, truncated, SIGBUS) a running server's weights
        loaded = buffers[target] = tensor.to(device=device, dtype=dtype, copy=True)
    _check_finite(ckpt_name, tensor, loaded)


def _check_finite(ckpt_name: str, written: torch.Tensor, loaded: torch.Tensor) -> None:
    """NaN or inf in a weight makes every logit NaN, and argmax then serves token 0 to every request: refuse
    it at load, naming the tensor and whether the file holds it or the serving dtype made it (float16 tops
    out at 65504; bfloat16 checkpoints can hold more)."""
    if torch.isfinite(loaded.sum()):  # one vectorised pass (isfinite is 15x slower on CPU); a sum that
        return                        # overflows only sends us to the exact count below
    bad = int((~torch.isfinite(loaded)).sum())
    if bad:
        cause = ("in the checkpoint" if not torch.isfinite(written).all() else
                 f"after conversion to {loaded.dtype} (values out of its range; serve with a wider dtype)")
        raise CheckpointError(f"tensor {ckpt_name}: {bad} of {loaded.numel()} values are NaN or infinite {cause}")
