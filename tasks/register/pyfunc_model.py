"""MLflow pyfunc text generator for a trained GPT-Neo (logged as a model from code, never pickled).

`mlflow.pyfunc.load_model("models:/<name>@champion").predict({"prompt": [...]}, params=...)` returns
one completion per prompt; `mlflow models serve` serves the same over HTTP (`{"dataframe_records":
[{"prompt": ...}], "params": {...}}`). The model is logged with `SIGNATURE`, whose params schema is
what makes MLflow pass `params` through at all (without one it drops them with "Ignoring provided
params"): max_new_tokens, temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed.
Generation stops at `<|endoftext|>`.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd


DEFAULTS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": 0}


def signature() -> "mlflow.models.ModelSignature":
    """Input: a `prompt` string column; output: one string per prompt; params with their defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {"max_new_tokens": "long", "temperature": "double", "top_k": "long", "top_p": "double", "seed": "long"}
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(k, kinds[k], v) for k, v in DEFAULTS.items()]))


class GPTNeoGenerator(mlflow.pyfunc.PythonModel):
    # The model is logged with an explicit signature (`signature()`); this MLflow switch turns off its
    # type-hint-based validation of predict() and the warning, at every load, that asks for hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        from neo_model import GPTNeo

        model_dir = Path(context.artifacts["model"])
        self.model = GPTNeo.from_pretrained(model_dir).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.encode_special_tokens = True  # prompt text is text, as in tasks.tokenize.bpe.load_tokenizer
        import inspect

        self._supports_top_p = "top_p" in inspect.signature(self.model.generate).parameters

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        params = {**DEFAULTS, **(params or {})}
        if isinstance(model_input, pd.DataFrame):
            column = model_input["prompt"].tolist()
        elif isinstance(model_input, dict):
            column = list(model_input["prompt"])
        else:
            column = list(model_input)
        # {"prompt": [a, b]} reaches a model with a signature as one row holding the list
        prompts = [str(p) for v in column for p in (v if isinstance(v, (list, tuple, np.ndarray)) else [v])]
        gen = torch.Generator().manual_seed(int(params["seed"]))
        eos = self.model.config.eos_token_id
        out = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt).ids or [eos]
            x = torch.tensor([ids], dtype=torch.long)
            options = {"max_new_tokens": int(params["max_new_tokens"]),
                       "temperature": float(params["temperature"]), "top_k": int(params["top_k"]) or None,
                       "generator": gen, "eos_token_id": eos}
            if self._supports_top_p:  # a model directory written before top-p existed has no such option
                options["top_p"] = float(params["top_p"])
            y = self.model.generate(x, **options)
            out.append(self.tokenizer.decode(y[0, len(ids):].tolist()))
        return out


mlflow.models.set_model(GPTNeoGenerator())
