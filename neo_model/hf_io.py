"""Read and write GPT-Neo checkpoints in the Hugging Face directory layout.

A directory holds `config.json` plus `model.safetensors`, or above a size threshold HF's sharded layout
(`model.safetensors.index.json` + `model-0000i-of-0000n.safetensors`). The tied `lm_head.weight` is not
written, as HF does; an `lm_head.weight` copy equal to `wte` (as in released checkpoints) is accepted. Loading never
unpickles: safetensors first, and a legacy `pytorch_model.bin` only via `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GPTNeoConfig
from .model import GPTNeo

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' historical "5GB"
_TIED_KEY = "lm_head.weight"
# Causal-mask buffers that older HF versions stored in checkpoints; we rebuild masks at run time.
_IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _shard_groups(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Keys split into consecutive groups of at most max_shard_size bytes (a bigger tensor stands alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def save_pretrained(model: GPTNeo, directory: str | Path, max_shard_size: int | None = None) -> Path:
    """Write the weights, then `directory/config.json`; returns the directory (see write_pretrained)."""
    return write_pretrained(model.config, model.state_dict(), directory, max_shard_size)


def write_pretrained(config: GPTNeoConfig, state_dict: dict[str, torch.Tensor], directory: str | Path,
                     max_shard_size: int | None = None) -> Path:
    """Write a GPT-Neo state dict (e.g. gathered from a sharded model), then `directory/config.json`.

    Up to max_shard_size bytes (default DEFAULT_MAX_SHARD_SIZE, HF's 5 GB) the weights go into one
    `model.safetensors`; above it into `model-0000i-of-0000n.safetensors` shards plus HF's
    `model.safetensors.index.json` (metadata.total_size, weight_map key -> shard file). Weight files of
    an earlier save in another layout are removed, so the directory never holds two versions.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else int(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    # safetensors refuses shared or strided storage: drop the tied head, copy views into fresh tensors.
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in state_dict.items() if k != _TIED_KEY}
    dtype = next(iter(tensors.values())).dtype
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups = _shard_groups(tensors, limit) if total > limit else [list(tensors)]
    written: set[str] = set()
    if len(groups) == 1:
        # transformers refuses safetensors files without format metadata.
        _atomic_write(directory / WEIGHTS_NAME,
                      lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        written.add(WEIGHTS_NAME)
    else:
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(groups, start=1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            shard = {k: tensors[k] for k in keys}
            _atomic_write(directory / name, lambda p, shard=shard: save_file(shard, str(p),
                                                                            metadata={"format": "pt"}))
            weight_map.update({k: name for k in keys})
            written.add(name)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(directory / INDEX_NAME,
                      lambda p: p.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n"))
        written.add(INDEX_NAME)
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_NAME]:
        if stale.name not in written and stale.exists():
            stale.unlink()
    config = config.to_hf_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    # config.json last: a directory with a config is a complete checkpoint.
    _atomic_write(directory / CONFIG_NAME,
                  lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory


def _read_state_dict(directory: Path, device: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded, safetensors or legacy .bin."""
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME), device=device)
    for index_name, loader in ((INDEX_NAME, lambda p: load_file(str(p), device=device)),
                               ("pytorch_model.bin.index.json",
                                lambda p: torch.load(p, map_location=device, weights_only=True))):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(directory / shard))
            return state
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location=device, weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME}, sharded index or pytorch_model.bin in {directory}")


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop mask buffers and the head; add the `transformer.` prefix of a bare GPTNeoModel save.

    Released checkpoints carry `lm_head.weight` as a copy of `wte`: accepted when equal, since the model
    ties them; a head that really differs cannot be represented and raises ValueError.
    """
    head = state.get(_TIED_KEY)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES) and k != _TIED_KEY}
    if state and not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    wte = state.get("transformer.wte.weight")
    if head is not None and wte is not None and not (head.shape == wte.shape and torch.equal(head, wte)):
        raise ValueError("lm_head.weight differs from transformer.wte.weight: GPTNeo ties the output head "
                         "to the token embedding and cannot load an untied head")
    return state


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint directory's tensors on CPU (single-file or sharded), normalised as GPTNeo names
    them, without the tied head."""
    return _normalise_keys(_read_state_dict(Path(directory), "cpu"))


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> GPTNeo:
    """Build a GPTNeo from a checkpoint directory (ours or HF's), in eval mode.

    dtype None keeps the stored dtype. Raises ValueError naming the key on missing or unexpected tensors
    and on shape mismatches.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found")
    config = GPTNeoConfig.from_hf_dict(json.loads(config_path.read_text()))
    device = torch.device(map_location)
    state = _normalise_keys(_read_state_dict(directory, str(device)))

    # Build on the meta device (no memory, no init cost), then check keys before allocating anything.
    with torch.device("meta"):
        model = GPTNeo(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != _TIED_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"checkpoint {directory} is missing keys: {missing}")
    if unexpected:
        raise ValueError(f"checkpoint {directory} has unexpected keys: {unexpected}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(state[key].shape)}, "
                             f"config expects {tuple(shape)}")

    if dtype is None:
        dtype = state["transformer.wte.weight"].dtype
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    # to_empty re-creates each module's parameters separately, which breaks the tie: restore it.
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()
