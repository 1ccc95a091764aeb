"""Our WikiText-style perplexity vs lm-evaluation-harness on the same HF export and the same text.

Exports a small GPT-Neo (briefly trained on the text so figures are not uniform noise) with
`tasks.train.export`, scores the documents with `tasks.evaluate.evals.perplexity`, runs `lm_eval --model hf` with a
local `loglikelihood_rolling` task over the same JSONL, and prints both sets of figures and their
relative differences (word_perplexity, byte_perplexity, bits_per_byte).

lm-eval is not a project dependency (it pulls in `datasets`, `evaluate` and more). Point
`--lm-eval-python` at an interpreter that has `lm-eval==0.4.13` and `accelerate`; without one, the
script scores our side only and says that the comparison was not made.

  python benchmarks/bench_eval_parity.py --lm-eval-python /tmp/lmeval-venv/bin/python
  python benchmarks/bench_eval_parity.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neo_model import GPTNeo, GPTNeoConfig  # noqa: E402
from tasks.core.train_config import EvalTaskConfig  # noqa: E402
from tasks.evaluate.evals.perplexity import run_perplexity  # noqa: E402
from tasks.train.export import write_tokenizer_files  # noqa: E402
from tasks.tokenize.bpe import train_tokenizer  # noqa: E402

WIKI = ROOT.parent / "shared" / "corpora" / "wikitext2-valid.txt"


def documents(n: int) -> list[str]:
    if WIKI.is_file():  # WikiText-2 articles start with " = Title = " lines
        text = WIKI.read_text(encoding="utf-8")
        parts = [p for p in text.split("\n = ") if len(p) > 400]
        return [" = " + p.strip("\n") + "\n" for p in parts[:n]]
    import random

    rng = random.Random(0)
    words = "the of and to in a is was for on as with by at from his that it an were which".split()
    return [" ".join(rng.choice(words) for _ in range(300)) + "\n" for _ in range(n)]


def build_model(docs: list[str], out: Path, steps: int) -> None:
    tok = train_tokenizer(docs, 1024)
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = GPTNeoConfig.from_preset("debug", vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
                                   window_size=32, eos_token_id=0, bos_token_id=0)
    model = GPTNeo(cfg)
    ids = torch.tensor([i for d in docs for i in [0] + tok.encode(d).ids])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):  # a little training so the comparison is not made on a uniform model
        starts = torch.randint(0, len(ids) - 129, (8,), generator=torch.Generator().manual_seed(step))
        batch = torch.stack([ids[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    write_tokenizer_files(out, out / "tokenizer.json")


def lm_eval_figures(python: str, model_dir: Path, data: Path, work: Path) -> dict[str, float]:
    task_dir = work / "tasks"
    task_dir.mkdir()
    (task_dir / "neo_parity.yaml").write_text(
        "task: neo_parity\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [python, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", "neo_parity", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(work / "out")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    result = json.loads(next((work / "out").rglob("results_*.json")).read_text())["results"]["neo_parity"]
    return {k: result[f"{k},none"] for k in ("word_perplexity", "byte_perplexity", "bits_per_byte")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; lm-eval only if --lm-eval-python given")
    ap.add_argument("--lm-eval-python", default=None, help="interpreter with lm-eval installed")
    ap.add_argument("--docs", type=int, default=20)
    args = ap.parse_args()
    n_docs, steps = (3, 5) if args.smoke else (args.docs, 150)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = documents(n_docs)
        data = work / "docs.jsonl"
        data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        model_dir = work / "model"
        model_dir.mkdir()
        build_model(docs, model_dir, steps)
        t0 = time.time()
        from tokenizers import Tokenizer

        ours = run_perplexity(EvalTaskConfig(name="parity", kind="perplexity", path=str(data)),
                              GPTNeo.from_pretrained(model_dir), Tokenizer.from_file(str(model_dir / "tokenizer.json")))
        t_ours = time.time() - t0
        text_bytes = sum(len(d.encode()) for d in docs)
        print(f"{len(docs)} documents, {text_bytes:,} bytes ({'WikiText-2 valid' if WIKI.is_file() else 'generated'})")
        print(f"ours   : word_ppl {ours['word_perplexity']:.6f}  byte_ppl {ours['byte_perplexity']:.6f}  "
              f"bpb {ours['bits_per_byte']:.6f}  ({t_ours:.1f} s)")
        if not args.lm_eval_python:
            print("lm-eval: no --lm-eval-python given: comparison NOT made")
            return
        t0 = time.time()
        theirs = lm_eval_figures(args.lm_eval_python, model_dir, data, work)
        print(f"lm-eval: word_ppl {theirs['word_perplexity']:.6f}  byte_ppl {theirs['byte_perplexity']:.6f}  "
              f"bpb {theirs['bits_per_byte']:.6f}  ({time.time() - t0:.1f} s incl. start-up)")
        worst = max(abs(ours[k] / theirs[k] - 1) for k in theirs)
        print(f"max relative difference: {worst:.2e}")
        if worst > 1e-4:
            sys.exit(f"figures differ by {worst:.2e} (> 1e-4)")


if __name__ == "__main__":
    main()
