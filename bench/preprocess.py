"""Preprocessing throughput: N synthetic conversations of about 1k tokens, real o200k_harmony tokenizer.

Target (issue: foundation): 10,000 conversations in 20 s or less on 2 CPU cores. Run with ``make bench-data`` or
``python bench/preprocess.py --conversations 10000 --num_proc 2``. Not a test: timings go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

from osstune.chat.options import RenderOptions
from osstune.chat.tokenizer import build_o200k_harmony_tokenizer
from osstune.config import DataArgs
from osstune.data.pipeline import prepare_dataset

WORDS = ("the model reads every token and learns which parts of a conversation it must produce; reasoning goes to "
         "the analysis channel while the answer goes to the final channel of the harmony format. numbers like 42, "
         "3.14 and 2048 appear too, as do names, places, code such as def f(x): return x * 2, and punctuation!").split()
ZH = "模型在训练时只学习助手的回答部分，推理内容放在分析通道，最终答案放在最终通道。"


def text(rng: random.Random, n_words: int) -> str:
    """Random prose of about ``n_words`` words, with some Chinese."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), ZH)
    return " ".join(words)


def conversation(rng: random.Random) -> dict:
    """One conversation of about 1k tokens: optional system, 1-3 rounds, reasoning on assistant turns."""
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": text(rng, 20)})
    rounds = rng.choice((1, 1, 2, 3))
    budget = 750 // rounds
    for _ in range(rounds):
        msgs.append({"role": "user", "content": text(rng, budget // 4)})
        msgs.append({"role": "assistant", "thinking": text(rng, budget // 3), "content": text(rng, budget // 3)})
    return {"messages": msgs}


def main() -> None:
    """Write the synthetic data, prepare it once cold (no cache), print the timing line."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--conversations", type=int, default=10_000)
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()

    tokenizer = build_o200k_harmony_tokenizer()
    rng = random.Random(opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(opts.conversations):
                f.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
        args = DataArgs(dataset=[str(path)], dataset_num_proc=opts.num_proc, load_from_cache_file=False)
        start = time.perf_counter()
        prepared = prepare_dataset(args, RenderOptions(current_date="2026-01-01"), tokenizer,
                                   show_progress=False, cache_dir=Path(tmp) / "cache")
        seconds = time.perf_counter() - start
    report = prepared.report
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit {commit}")
    print(f"conversations: {opts.conversations:,}  samples: {len(prepared.train):,}  tokens: {report.total_tokens:,}"
          f"  mean tokens/conversation: {report.total_tokens / opts.conversations:,.0f}")
    print(f"num_proc {opts.num_proc}: {seconds:.2f} s  ->  {opts.conversations / seconds:,.0f} conversations/s, "
          f"{report.total_tokens / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
