"""The checkable task: 2-digit + 2-digit addition with the column steps written out, character by character.

    prompt      "47+85:"
    thinking    "7+5=12,4+8+1=13"     units column, then tens column with its carry (always written)
    marker      "|"                   the end of the thinking phase: blending stops here
    answer      "132;"                three digits (zero-padded), then the end-of-sequence ';'

Every completion has the same 20 characters, so a wrong answer is a wrong step, never a format to
guess. The reward reads only the three characters after the first '|'.
"""

from __future__ import annotations

import random

import torch

CHARS = "_0123456789+=,:|;"  # '_' pads; index 0
PAD, THINK_END, EOS = 0, CHARS.index("|"), CHARS.index(";")
STOI = {c: i for i, c in enumerate(CHARS)}
PROMPT_LEN, COMPLETION_LEN = 6, 20


def encode(s: str) -> list[int]:
    return [STOI[c] for c in s]


def decode(ids) -> str:
    return "".join(CHARS[int(i)] for i in ids)


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}:"


def solution(a: int, b: int) -> str:
    u = a % 10 + b % 10
    t = a // 10 + b // 10 + u // 10
    return f"{a % 10}+{b % 10}={u:02d},{a // 10}+{b // 10}+{u // 10}={t:02d}|{a + b:03d};"


def reward(completion_ids, a: int, b: int) -> float:
    """1 if the three characters after the first '|' are a + b, else 0."""
    text = decode(completion_ids)
    if "|" not in text:
        return 0.0
    answer = text.split("|", 1)[1][:3]
    return 1.0 if answer.isdigit() and int(answer) == a + b else 0.0


ALL = [(a, b) for a in range(10, 100) for b in range(10, 100)]  # 8,100 problems


def split(test_size: int = 256, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """A fixed held-out test set (the same for every run) and the training problems."""
    problems = ALL[:]
    random.Random(seed).shuffle(problems)
    return problems[test_size:], problems[:test_size]


def prompt_batch(problems: list[tuple[int, int]]) -> torch.Tensor:
    return torch.tensor([encode(prompt(a, b)) for a, b in problems])  # (B, 6)


def supervised_batch(problems: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (B, 26) and labels with the prompt masked (-100): the loss is on the completion."""
    ids = torch.tensor([encode(prompt(a, b) + solution(a, b)) for a, b in problems])
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return ids, labels
