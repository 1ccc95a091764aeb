"""MLflow pyfunc text generator for a trained GPT-Neo (logged as a model from code, never pickled).

`mlflow.pyfunc.load_model("models:/<name>@champion").predict({"prompt": [...]})` returns one
completion per prompt; `mlflow models serve` serves the same over HTTP. Params: max_new_tokens,
temperature (0 = greedy), top_k, top_p, seed. Generation stops at `<|endoftext|>`.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class GPTNeoGenerator(mlflow.pyfunc.PythonModel):
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

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            prompts = model_input["prompt"].astype(str).tolist()
        elif isinstance(model_input, dict):
            prompts = list(model_input["prompt"])
        else:
            prompts = [str(p) for p in model_input]
        gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
        eos = self.model.config.eos_token_id
        out = []
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt).ids or [eos]
            x = torch.tensor([ids], dtype=torch.long)
            options = {"max_new_tokens": int(params.get("max_new_tokens", 64)),
                       "temperature": float(params.get("temperature", 0.8)),
                       "top_k": int(params.get("top_k", 50)), "generator": gen, "eos_token_id": eos}
            if "top_p" in params and self._supports_top_p:
                options["top_p"] = float(params["top_p"])
            y = self.model.generate(x, **options)
            out.append(self.tokenizer.decode(y[0, len(ids):].tolist()))
        return out


mlflow.models.set_model(GPTNeoGenerator())
