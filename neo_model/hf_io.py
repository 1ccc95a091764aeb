"""Read and write GPT-Neo checkpoints in the Hugging Face directory layout.

A directory holds `config.json` plus `model.safetensors` (or HF's sharded
`model.safetensors.index.json`). The tied `lm_head.weight` is not written, as HF does. Loading never
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
_TIED_KEY = "lm_head.weight"
# Causal-mask buffers that older HF versions stored in checkpoints; we rebuild masks at run time.
_IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")


def _atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`, so readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_pretrained(model: GPTNeo, directory: str | Path) -> Path:
    """Write `directory/model.safetensors` then `directory/config.json`; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or strided storage: drop the tied head, copy views into fresh tensors.
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in model.state_dict().items() if k != _TIED_KEY}
    dtype = next(iter(tensors.values())).dtype
    # transformers refuses safetensors files without format metadata.
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = model.config.to_hf_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    # config.json last: a directory with a config is a complete checkpoint.
    _atomic_write(directory / CONFIG_NAME,
                  lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory


def _read_state_dict(directory: Path, device: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, single-file or sharded, safetensors or legacy .bin."""
    if (directory / WEIGHTS_NAME).exists():
        return load_file(str(directory / WEIGHTS_NAME), device=device)
    for index_name, loader in (("model.safetensors.index.json", lambda p: load_file(str(p), device=device)),
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
    """Drop mask buffers and the tied head; add the `transformer.` prefix of a bare GPTNeoModel save."""
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES) and k != _TIED_KEY}
    if state and not any(k.startswith("transformer.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    return state


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
