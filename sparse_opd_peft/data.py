"""Prompt datasets and simple verifier rewards for the command line (``sparse-opd train``).

A prompt source is either a local ``.json`` / ``.jsonl`` / ``.parquet`` file (read with ``datasets.load_dataset("json"
| "parquet", data_files=...)``) or a ``datasets`` Hub id (``org/name``; ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``
read the local cache). :func:`load_prompts` renames the user's columns to the trainer's ``prompt`` / ``answer`` /
``completion`` and drops every other column. :func:`make_reward` builds the verifier rewards the CLI offers:
``exact`` (the completion before EOS equals the answer column, whitespace-stripped) and named task verifiers the
caller passes in (the CLI passes the lab's toy tasks as ``toy:<task>``: :func:`sparse_opd_peft.lab.toy.reward_verifiers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Protocol

__all__ = ["LOCAL_FORMATS", "REWARDS", "Verifier", "load_prompts", "make_reward"]

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
REWARDS = ("none", "exact")
"""The rewards :func:`make_reward` offers without task verifiers."""

RewardFn = Callable[[list[str], list[str], list[Any]], Sequence[float]]


class Verifier(Protocol):
    """A task's verifier, as :func:`make_reward` uses it (e.g. a toy world task, ``sparse_opd_peft.lab.toy.Task``)."""

    def answer(self, prompt: str) -> str:
        """The reference answer of ``prompt``; ``ValueError`` when ``prompt`` is not one of the task's prompts."""
        ...

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """One reward per completion of the matching prompt."""
        ...


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: " + (text[:limit] + " ..." if len(text) > limit else text)


# Suffixes that mark a file name rather than a Hub id (read or rejected locally, never looked up on the Hub).
_FILE_SUFFIXES = {*LOCAL_FORMATS, ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".xz", ".bz2", ".zip", ".tar"}


def _looks_local(source: str) -> bool:
    p = Path(source).expanduser()
    return (
        p.exists() or p.suffix.lower() in _FILE_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") > 1
    )


def _load_raw(source: str, split: Optional[str], config_name: Optional[str]):
    """``datasets.Dataset`` of one split of a local file or a Hub dataset (errors become ``ValueError`` /
    ``FileNotFoundError`` naming the source)."""
    from datasets import load_dataset

    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"prompts {source}: no such file")
        if path.is_dir():
            raise IsADirectoryError(f"prompts {source} is a directory; pass a .json, .jsonl or .parquet file")
        builder = LOCAL_FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"prompts {source}: unsupported file type {path.suffix or '(no suffix)'!r}; use a .json / .jsonl "
                "(one object per line) or .parquet file with a prompt column, or a datasets Hub id"
            )
        size = path.stat().st_size
        if size == 0 or (builder == "json" and size < 2**16 and not path.read_bytes().strip()):
            raise ValueError(
                f"prompts {source}: the file is empty; a .jsonl file needs one JSON object per line with a prompt "
                'column, e.g. {"prompt": "1+2=", "answer": "3"}'
            )
        try:
            return load_dataset(builder, data_files=str(path), split=split or "train")
        except Exception as err:  # noqa: BLE001 - datasets wraps parse errors in many types
            raise ValueError(f"prompts {source}: cannot read it as {builder} ({_short(err)})") from None
    try:
        return load_dataset(source, config_name, split=split or "train")
    except Exception as err:  # noqa: BLE001 - hub / cache / split errors: one clear line
        raise ValueError(
            f"prompts {source!r}: cannot load this datasets Hub id (split {split or 'train'!r}"
            f"{f', config {config_name!r}' if config_name else ''}): {_short(err)}. Check the id, --split and "
            "--dataset-config; offline, the dataset must already be in the local datasets cache"
        ) from None


def load_prompts(
    source: str,
    split: Optional[str] = None,
    prompt_column: str = "prompt",
    answer_column: Optional[str] = None,
    completion_column: Optional[str] = None,
    config_name: Optional[str] = None,
):
    """Load a prompt dataset for :class:`~sparse_opd_peft.opd.OPDTrainer`.

    Args:
        source: a local ``.json`` / ``.jsonl`` / ``.parquet`` file or a ``datasets`` Hub id.
        split: split to read (default ``"train"``; slicing such as ``"train[:1000]"`` works).
        prompt_column: column holding the prompt text (required).
        answer_column: column holding the reference answer (for rewards / SFT); ``None`` uses ``answer`` when the
            dataset has one. Values are converted to ``str``.
        completion_column: column holding SFT completions; ``None`` uses ``completion`` when present.
        config_name: the Hub dataset's configuration (e.g. ``"main"`` for ``openai/gsm8k``).

    Returns:
        ``datasets.Dataset`` with columns ``prompt`` (str) and, when available, ``answer`` / ``completion`` (str).

    Raises:
        FileNotFoundError / ValueError: missing or unreadable source, unknown split, unknown column, empty dataset,
            non-string prompts (each message names the source and the fix).
    """
    ds = _load_raw(source, split, config_name)
    cols = list(ds.column_names)
    wanted = {"prompt": prompt_column}
    for target, given in (("answer", answer_column), ("completion", completion_column)):
        if given is not None:
            wanted[target] = given
        elif target in cols:
            wanted[target] = target
    for target, column in wanted.items():
        if column not in cols:
            flag = "--prompt-column" if target == "prompt" else f"--{target}-column"
            raise ValueError(f"prompts {source}: no column {column!r} ({flag}); the dataset has columns {cols}")
    if len(ds) == 0:
        raise ValueError(f"prompts {source}: split {split or 'train'!r} is empty")
    ds = ds.select_columns(list(dict.fromkeys(wanted.values())))
    data = {target: list(ds[column]) for target, column in wanted.items()}
    bad = next((i for i, p in enumerate(data["prompt"]) if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(
            f"prompts {source}: column {prompt_column!r} must hold text, row {bad} is {type(data['prompt'][bad]).__name__}"
            " (chat-formatted prompts: render them to text with the tokenizer's chat template first)"
        )
    for target in ("answer", "completion"):
        if target in data:
            data[target] = ["" if v is None else str(v) for v in data[target]]
    from datasets import Dataset

    return Dataset.from_dict(data)


def make_reward(
    spec: str, dataset, eos_token: Optional[str], verifiers: Optional[Mapping[str, Verifier]] = None
) -> Optional[RewardFn]:
    """Verifier reward named by ``spec`` for the prompts of ``dataset`` (checked up front).

    Args:
        spec: ``"none"``; ``"exact"`` (1.0 when the completion text before the first EOS, stripped, equals the
            ``answer`` column, stripped; else 0.0); or a key of ``verifiers`` such as ``"toy:add"`` (that task's
            verifier: the prompts must be that task's prompts such as ``"123+045="``).
        dataset: output of :func:`load_prompts`.
        eos_token: the tokenizer's EOS string (completions are decoded with it).
        verifiers: task verifiers by reward name ``"<family>:<task>"`` (the CLI passes the toy world's,
            :func:`sparse_opd_peft.lab.toy.reward_verifiers`); ``None``: only ``none`` and ``exact``.

    Returns:
        ``reward_fn(prompts, completions, answers) -> list[float]``, or ``None`` for ``"none"``.

    Raises:
        ValueError: unknown spec, ``exact`` without an answer column, task prompts that do not parse.
    """
    verifiers = dict(verifiers or {})
    choices = (*REWARDS, *verifiers)
    if spec == "none":
        return None
    if spec == "exact":
        if "answer" not in dataset.column_names:
            raise ValueError("--reward exact compares completions with the answer column; pass --answer-column NAME")

        def exact(prompts: list[str], completions: list[str], answers: list[Any]) -> list[float]:
            cut = [c.split(eos_token, 1)[0] if eos_token else c for c in completions]
            return [float(c.strip() == str(a).strip()) for c, a in zip(cut, answers, strict=True)]

        return exact
    family, sep, name = spec.partition(":")
    if sep and any(key.partition(":")[0] == family for key in verifiers):
        if spec not in verifiers:
            raise ValueError(f"--reward {spec}: unknown {family} task {name!r}; choose one of {choices}")
        task = verifiers[spec]
        for i, prompt in enumerate(dataset["prompt"]):
            try:
                task.answer(prompt)
            except ValueError as err:
                raise ValueError(
                    f"--reward {spec}: prompt row {i} is not a {family} {name!r} prompt ({err}); {family} rewards only "
                    f"score the {family} world's tasks, use --reward exact with an answer column for other data"
                ) from None
        return lambda prompts, completions, answers: task.rewards(prompts, completions)
    raise ValueError(f"--reward {spec!r} is unknown; choose one of {', '.join(choices)}")
