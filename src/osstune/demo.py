"""``osstune demo``: the end-to-end demo on a tiny gpt-oss (it arrives with the training stage)."""

from __future__ import annotations

from typing import Any


def run(args: dict[type, Any]) -> int:
    """Say what the demo will do; training is not part of osstune yet."""
    print("osstune demo: the training demo arrives with `osstune sft`. Until then, try\n"
          "  osstune data --model MODEL_DIR --dataset self-cognition#20 --model_name Mimi --model_author osstune "
          "--preview 2")
    return 0
