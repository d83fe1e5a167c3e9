"""Procedural arithmetic tasks with exact verifiers.

Every task writes a fixed-width prompt ``"aaa?bbb="`` (zero-padded 3-digit operands) and expects a fixed-width
answer written **least-significant digit first** (``123+456=`` -> ``"9750"``, i.e. 0579 reversed). Reversed digits
let a left-to-right causal model compute carries / borrows in the order it emits the digits, which is what makes a
~1 M-parameter model reach ~99 % in a few minutes on CPU; in plain order the first digit depends on every carry
and the same models plateau far lower. The answer column of the datasets holds the string exactly as the model
must emit it (before its EOS token).

Tasks:
    ``add``: ``a + b`` for ``a, b`` in ``[0, 999]``, answer = 4 reversed digits of the sum (carry algorithm).
    ``sub``: ``a - b`` for ``0 <= b <= a <= 999``, answer = 3 reversed digits of the difference (borrow algorithm).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from datasets import Dataset, DatasetDict

from .tokenizer import EOS_TOKEN

_PROMPT_RE = re.compile(r"^(\d{3})([+\-])(\d{3})=$")


@dataclass(frozen=True)
class Task:
    """One procedural task: how to sample a problem and how to score a completion.

    Attributes:
        name: registry name (``"add"``, ``"sub"``).
        operator: the operator character in the prompt.
        answer_width: number of characters of every answer (the completion is ``answer + EOS``).
        description: one-line human description.
    """

    name: str
    operator: str
    answer_width: int
    description: str
    _sample: Callable[[random.Random], tuple[int, int]]
    _compute: Callable[[int, int], int]

    def make_example(self, rng: random.Random) -> tuple[str, str]:
        """Sample one problem: returns ``(prompt, answer)``, e.g. ``("123+456=", "9750")``."""
        a, b = self._sample(rng)
        return self.format_prompt(a, b), self.answer_for_operands(a, b)

    def format_prompt(self, a: int, b: int) -> str:
        """The prompt text for operands ``a`` and ``b`` (each in ``[0, 999]``)."""
        if not (0 <= a <= 999 and 0 <= b <= 999):
            raise ValueError(f"task {self.name!r}: operands must be in [0, 999], got {a}, {b}")
        return f"{a:03d}{self.operator}{b:03d}="

    def answer_for_operands(self, a: int, b: int) -> str:
        """The reversed, zero-padded answer string for operands ``a`` and ``b``."""
        value = self._compute(a, b)
        if value < 0:
            raise ValueError(f"task {self.name!r}: operands {a}, {b} give a negative result")
        return f"{value:0{self.answer_width}d}"[::-1]

    def answer(self, prompt: str) -> str:
        """The expected answer for a prompt of this task.

        Raises:
            ValueError: when ``prompt`` is not a prompt of this task.
        """
        m = _PROMPT_RE.match(prompt)
        if m is None or m.group(2) != self.operator:
            raise ValueError(f"not a {self.name!r} prompt: {prompt!r} (expected e.g. '123{self.operator}045=')")
        return self.answer_for_operands(int(m.group(1)), int(m.group(3)))

    def verify(self, prompt: str, completion: str) -> float:
        """Reward of a completion: 1.0 when its text before the first EOS equals the answer exactly, else 0.0.

        ``completion`` is the decoded continuation of the prompt (prompt not included). Anything after the first
        ``"<eos>"`` is ignored; a completion without EOS is compared as a whole. No whitespace is stripped.

        Raises:
            ValueError: when ``prompt`` is not a prompt of this task (a bug, not a wrong answer).
        """
        expected = self.answer(prompt)
        return 1.0 if completion.split(EOS_TOKEN, 1)[0] == expected else 0.0

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Batched :meth:`verify`: one float reward per (prompt, completion) pair."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return [self.verify(p, c) for p, c in zip(prompts, completions, strict=True)]


def _sample_add(rng: random.Random) -> tuple[int, int]:
    return rng.randrange(1000), rng.randrange(1000)


def _sample_sub(rng: random.Random) -> tuple[int, int]:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return (a, b) if a >= b else (b, a)


TASKS: dict[str, Task] = {
    "add": Task("add", "+", 4, "a+b for 3-digit a, b; 4 reversed sum digits", _sample_add, lambda a, b: a + b),
    "sub": Task("sub", "-", 3, "a-b for 3-digit b <= a; 3 reversed difference digits", _sample_sub, lambda a, b: a - b),
}


def get_task(name: str | Task) -> Task:
    """Look up a task by registry name (a :class:`Task` is returned unchanged).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown toy task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def reward_verifiers() -> dict[str, Task]:
    """The toy tasks as named verifiers for :func:`sparse_opd_peft.data.make_reward` (``sparse-opd train --reward
    toy:add``): ``{"toy:<task>": task}``."""
    return {f"toy:{name}": task for name, task in TASKS.items()}


def make_splits(task: str | Task, n_train: int, n_heldout: int, seed: int = 0) -> DatasetDict:
    """Sample disjoint train / held-out splits of a task.

    Held-out prompts are drawn first (unique), then train prompts (unique, never a held-out prompt), all from a
    ``random.Random`` seeded by ``(seed, task name)`` so the splits are identical across runs and platforms.

    Returns:
        ``DatasetDict`` with ``"train"`` (``n_train`` rows) and ``"heldout"`` (``n_heldout`` rows), columns
        ``prompt`` and ``answer`` (strings).

    Raises:
        ValueError: for an unknown task, negative sizes, or sizes beyond the task's number of distinct prompts.
    """
    task = get_task(task)
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_heldout={n_heldout}")
    limit = 400_000  # well below the ~500 k distinct prompts of the smallest task, so rejection sampling stays fast
    if n_train + n_heldout > limit:
        raise ValueError(f"n_train + n_heldout must be <= {limit} for task {task.name!r}, got {n_train + n_heldout}")
    rng = random.Random(f"sparse_opd_peft.toy/{task.name}/{seed}")
    seen: set[str] = set()
    rows: dict[str, dict[str, list[str]]] = {}
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        prompts: list[str] = []
        answers: list[str] = []
        while len(prompts) < n:
            prompt, answer = task.make_example(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            prompts.append(prompt)
            answers.append(answer)
        rows[split] = {"prompt": prompts, "answer": answers}
    return DatasetDict({split: Dataset.from_dict(rows[split]) for split in ("train", "heldout")})
