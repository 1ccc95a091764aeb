"""Hugging Face export: a directory that `transformers` loads as GPTNeoForCausalLM +
PreTrainedTokenizerFast (and so lm-evaluation-harness's `--model hf` can evaluate it).

The train stage writes its final model this way; `neo export-hf` copies a registered version's files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

EOS = "<|endoftext|>"
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_tokenizer_files(model_dir: str | Path, tokenizer_json: str | Path) -> None:
    """Copy tokenizer.json beside the weights and add the small files transformers expects."""
    d = Path(model_dir)
    if Path(tokenizer_json).resolve() != (d / "tokenizer.json").resolve():
        shutil.copy2(tokenizer_json, d / "tokenizer.json")
    config = json.loads((d / "config.json").read_text())
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config["max_position_embeddings"],
         "add_prefix_space": False, "clean_up_tokenization_spaces": False, **specials}, indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")


def copy_export(src: str | Path, dst: str | Path) -> Path:
    """Copy an exported model directory (weights, shards, config, tokenizer files) to `dst`."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json, not a model directory")
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and (p.name in MODEL_FILES or p.name.startswith("model-")):
            shutil.copy2(p, dst / p.name)
    return dst
