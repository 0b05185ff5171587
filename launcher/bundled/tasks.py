"""Deterministic synthetic SFT tasks (reverse / add / convert) small enough for a ~1M-param model."""

from __future__ import annotations

import argparse
import json
import os
import random
import string
from pathlib import Path

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with the result only.",
    "You are a precise calculator.",
    "Reply briefly and exactly.",
    "You solve small puzzles about letters, numbers and units.",
    "Give just the final answer, nothing else.",
)
# Powers of ten only: the answer is the input with zeros appended, which a tiny model learns fast.
CONVERSIONS = (
    ("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("m", "mm", 1000),
    ("kg", "g", 1000), ("g", "mg", 1000), ("l", "ml", 1000), ("t", "kg", 1000),
)
# A few phrasings per task: realistic variety, and enough distinct words for a ~400-token BPE.
REVERSE_FORMS = ("reverse: {}", "Reverse the letters: {}", "Write backwards: {}")
ADD_FORMS = ("add {} {}", "What is {} plus {}?", "Sum of {} and {}:")
CONVERT_FORMS = ("{1} to {2}: {0}", "Convert {0} {1} to {2}.", "How many {2} are in {0} {1}?")
P_SYSTEM = 0.3
P_MULTI_TURN = 0.1


def _reverse(rng: random.Random) -> tuple[str, str]:
    # Letters are space-separated so each one is a single BPE token (" a"); merged multi-letter
    # tokens would make reversal a spelling task that a tiny model cannot learn in minutes.
    letters = rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))
    return rng.choice(REVERSE_FORMS).format(" ".join(letters)), " ".join(reversed(letters))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(50), rng.randrange(50)
    return rng.choice(ADD_FORMS).format(a, b), str(a + b)


def _convert(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.randint(1, 99)
    return rng.choice(CONVERT_FORMS).format(value, src, dst), str(value * factor)


TASKS = (_reverse, _add, _convert)
TASK_WEIGHTS = (0.4, 0.35, 0.25)


def generate_examples(n: int, seed: int = 0) -> list[dict]:
    """Return n rows in `messages` form; every user turn is unique across all n rows.

    Uniqueness is what makes a prefix/suffix split leak-free, and since draws never depend on
    n, generate_examples(k, s) is a prefix of generate_examples(n, s) for k <= n.
    """
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw_turn() -> tuple[str, str]:
        task = rng.choices(TASKS, TASK_WEIGHTS)[0]
        for _ in range(10_000):  # redraw within the task so the mix stays as weighted
            prompt, answer = task(rng)
            if prompt not in seen:
                seen.add(prompt)
                return prompt, answer
        raise RuntimeError("prompt space exhausted; ask for fewer examples")

    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < P_SYSTEM:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _turn in range(2 if rng.random() < P_MULTI_TURN else 1):
            prompt, answer = draw_turn()
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": answer})
        rows.append({"messages": messages})
    return rows


def _dump(rows: list[dict], path: Path) -> None:
    text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
    path.write_bytes(text.encode("utf-8"))


def write_dataset(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 2000,
                  n_eval: int = 200) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl (byte-deterministic, disjoint prompts); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = generate_examples(n_train + n_eval, seed)
    train, evl = out / "train.jsonl", out / "eval.jsonl"
    _dump(rows[:n_train], train)
    _dump(rows[n_train:], evl)
    return train, evl


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=200)
    a = p.parse_args(argv)
    for path in write_dataset(a.out, a.seed, a.n_train, a.n_eval):
        print(path)


if __name__ == "__main__":
    main()
