"""The toy world: tokenizer, task splits, teacher and student. One world ships with the package; others are built.

**The shipped world** (``sparse_opd_peft/lab/toy/shipped_world/``, package data): the tokenizer, teacher and student
anchor as safetensors (float32), with ``world.json``: the recipe that built them, the build record (held-out
accuracies, torch / transformers / Python versions, the command, timings) and the world's **key**, a hash of the
weight and tokenizer files. :func:`load_world` with no argument loads it: nothing is trained, and the weights are
bit-identical on every machine. The demo, tests, benchmarks, study and continual experiments use it by default.

**Built worlds.** :func:`build_world` with a recipe trains a world from it and caches it under
``<cache_dir>/<recipe hash>/{tokenizer,teacher,student}/`` plus ``world.json``. Training is deterministic on one
machine, but not across machines (CPU kernels differ in their last bits, and the student anchor's recipe stops SFT
at a chosen point of its trajectory), so a rebuilt world is another world: its key is the hash of its own files.
``python -m sparse_opd_peft.lab.toy --rebuild`` rebuilds the shipped world's recipe and prints both worlds' accuracies.
A build happens in a temporary sibling directory that is moved into place with ``os.replace``; a concurrent builder
that loses the race discards its copy and loads the winner's. Datasets are not stored: they are regenerated from the
recipe seed (deterministic and fast).

Speed: a build runs with ``torch.set_num_threads(recipe.num_threads)`` (default 1; the caller's thread count and
the global torch RNG state are restored afterwards). One thread is the default because these models are tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from datasets import DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from ...atomic import make_temp_dir, normalize_modes, write_text_atomic
from .evaluate import evaluate_accuracy
from .models import ModelSpec, build_model, train_sft
from .tasks import TASKS, Task, get_task, make_splits
from .tokenizer import build_tokenizer

RECIPE_VERSION = 1
"""Bump when code changes what a given recipe builds (data format, tokenizer, training loop)."""

ENV_CACHE_DIR = "SPARSE_OPD_CACHE"
SHIPPED_WORLD_DIR = Path(__file__).resolve().with_name("shipped_world")
"""The world that ships with the package (package data)."""
_KEYED_FILES = ("teacher/model.safetensors", "student/model.safetensors", "tokenizer/tokenizer.json")


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that determines the toy world (all fields enter the cache key).

    Attributes:
        seed: seeds the splits, model inits (teacher ``seed``, student ``seed + 1``) and data order.
        tasks: task names from :data:`TASKS`; teacher and student are both trained on the mixture of all of them.
        n_train: training prompts per task.
        n_heldout: held-out prompts per task (disjoint from train); build-time accuracies use all of them.
        batch_size: training batch size (examples drawn from the task mixture).
        weight_decay: AdamW weight decay.
        teacher, student: architecture + schedule of each model (see :class:`ModelSpec`).
        num_threads: torch intra-op threads used while building (set temporarily, restored afterwards).
    """

    seed: int = 0
    tasks: tuple[str, ...] = ("add", "sub")
    n_train: int = 50_000
    n_heldout: int = 2_000
    batch_size: int = 128
    weight_decay: float = 0.0
    teacher: ModelSpec = field(
        default_factory=lambda: ModelSpec(128, 4, 4, 2, 32, 512, steps=1200, lr=1e-3, warmup_steps=50)
    )
    student: ModelSpec = field(
        default_factory=lambda: ModelSpec(64, 2, 4, 2, 16, 256, steps=675, lr=1e-3, warmup_steps=50, decay_steps=2000)
    )
    num_threads: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str) or not self.tasks:
            raise ValueError(f"recipe.tasks must be a non-empty tuple of task names, got {self.tasks!r}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"recipe.tasks has duplicates: {self.tasks}")
        for name in self.tasks:
            get_task(name)
        if self.n_train <= 0 or self.n_heldout <= 0:
            raise ValueError(f"recipe.n_train and n_heldout must be > 0, got {self.n_train}, {self.n_heldout}")
        if self.batch_size <= 0:
            raise ValueError(f"recipe.batch_size must be > 0, got {self.batch_size}")
        if isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads <= 0:
            raise ValueError(f"recipe.num_threads must be an int > 0, got {self.num_threads!r}")
        if self.weight_decay < 0:
            raise ValueError(f"recipe.weight_decay must be >= 0, got {self.weight_decay}")
        for what in ("teacher", "student"):
            spec = getattr(self, what)
            if isinstance(spec, dict):
                spec = ModelSpec(**spec)
                object.__setattr__(self, what, spec)
            spec.validate(what)

    @classmethod
    def tiny(cls, seed: int = 0) -> ToyRecipe:
        """A recipe that builds in a few seconds (for tests): 1-layer models, tens of steps, small splits."""
        return cls(
            seed=seed,
            n_train=512,
            n_heldout=64,
            batch_size=32,
            teacher=ModelSpec(32, 1, 2, 1, 16, 64, steps=30, lr=3e-3, warmup_steps=5),
            student=ModelSpec(16, 1, 2, 1, 8, 32, steps=10, lr=3e-3, warmup_steps=5, decay_steps=30),
        )

    def to_dict(self) -> dict:
        """JSON-serialisable dict of all fields (``tasks`` as a list)."""
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ToyRecipe:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["tasks"] = tuple(d["tasks"])
        d["teacher"] = ModelSpec(**d["teacher"])
        d["student"] = ModelSpec(**d["student"])
        return cls(**d)


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def cache_key(recipe: ToyRecipe) -> str:
    """16-hex-digit name of a recipe's cache directory: sha256 of all recipe fields, RECIPE_VERSION and torch /
    transformers major.minor. It names where a build is cached, not the world: see :func:`world_key`."""
    payload = {
        "recipe": recipe.to_dict(),
        "recipe_version": RECIPE_VERSION,
        "torch": _major_minor(torch.__version__),
        "transformers": _major_minor(transformers.__version__),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def world_key(directory: str | os.PathLike) -> str:
    """16-hex-digit key of the world stored in ``directory``: sha256 of its teacher, student and tokenizer files.

    Two worlds with the same key hold bit-identical weights, whatever recipe or machine made them.

    Raises:
        FileNotFoundError: when one of the keyed files is missing.
    """
    digest = hashlib.sha256()
    for rel in _KEYED_FILES:
        file = Path(directory) / rel
        if not file.is_file():
            raise FileNotFoundError(f"toy world at {directory} is incomplete: {rel} is missing")
        digest.update(rel.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$SPARSE_OPD_CACHE`` if set, else ``~/.cache/sparse_opd_peft/toy``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_opd_peft" / "toy"


@dataclass
class ToyWorld:
    """A built or loaded toy world.

    Attributes:
        recipe: the recipe it was built from.
        tokenizer: the character tokenizer (left padding).
        teacher, student: float32 ``Qwen3ForCausalLM`` in eval mode, on CPU.
        tasks: task name -> :class:`Task` (recipe order).
        datasets: task name -> ``DatasetDict`` with ``train`` / ``heldout`` (columns ``prompt``, ``answer``).
        accuracies: ``{"teacher": {task: acc}, "student": {task: acc}}`` greedy held-out accuracy at build time.
        path: the world's directory (the shipped world's package folder, or ``<cache_dir>/<recipe hash>``).
        key: the world's key (:func:`world_key`: a hash of its weight and tokenizer files).
        from_cache: True when this call loaded an existing world (shipped or cached) rather than training one.
        build_seconds: wall time of the original build.
        record: the rest of ``world.json`` (versions and command of the build, timings).
    """

    recipe: ToyRecipe
    tokenizer: PreTrainedTokenizerBase
    teacher: Qwen3ForCausalLM
    student: Qwen3ForCausalLM
    tasks: dict[str, Task]
    datasets: dict[str, DatasetDict]
    accuracies: dict[str, dict[str, float]]
    path: Path
    key: str
    from_cache: bool
    build_seconds: float
    record: dict = field(default_factory=dict)

    @property
    def shipped(self) -> bool:
        """True when this is the world that ships with the package."""
        return self.path.resolve() == SHIPPED_WORLD_DIR

    @property
    def teacher_path(self) -> Path:
        """Directory of the saved teacher (``from_pretrained``-loadable)."""
        return self.path / "teacher"

    @property
    def student_path(self) -> Path:
        """Directory of the saved student anchor (``from_pretrained``-loadable)."""
        return self.path / "student"

    @property
    def tokenizer_path(self) -> Path:
        """Directory of the saved tokenizer (``AutoTokenizer.from_pretrained``-loadable)."""
        return self.path / "tokenizer"

    def load_student(self) -> Qwen3ForCausalLM:
        """A fresh float32 copy of the student anchor from disk (eval mode), e.g. to fine-tune without touching
        ``self.student``."""
        return _load_model(self.student_path)

    def load_teacher(self) -> Qwen3ForCausalLM:
        """A fresh float32 copy of the teacher from disk (eval mode)."""
        return _load_model(self.teacher_path)


def _load_model(path: Path) -> Qwen3ForCausalLM:
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per tiny model is noise; restored below
    try:
        model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def _splits(recipe: ToyRecipe) -> dict[str, DatasetDict]:
    return {name: make_splits(name, recipe.n_train, recipe.n_heldout, seed=recipe.seed) for name in recipe.tasks}


def _mixture(recipe: ToyRecipe, datasets: dict[str, DatasetDict]) -> tuple[list[str], list[str]]:
    prompts: list[str] = []
    answers: list[str] = []
    for name in recipe.tasks:
        prompts += datasets[name]["train"]["prompt"]
        answers += datasets[name]["train"]["answer"]
    return prompts, answers


def _build_into(directory: Path, recipe: ToyRecipe, progress: bool, command: str) -> None:
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    datasets = _splits(recipe)
    prompts, answers = _mixture(recipe, datasets)
    accuracies: dict[str, dict[str, float]] = {}
    train_seconds: dict[str, float] = {}
    for offset, role in enumerate(("teacher", "student")):
        spec: ModelSpec = getattr(recipe, role)
        t0 = time.perf_counter()
        model = build_model(spec, tokenizer, seed=recipe.seed + offset)
        train_sft(
            model,
            tokenizer,
            prompts,
            answers,
            spec,
            batch_size=recipe.batch_size,
            seed=recipe.seed + offset,
            weight_decay=recipe.weight_decay,
            progress=progress,
            desc=f"toy {role}",
        )
        train_seconds[role] = round(time.perf_counter() - t0, 2)
        accuracies[role] = {
            name: evaluate_accuracy(model, tokenizer, datasets[name]["heldout"], name) for name in recipe.tasks
        }
        model.save_pretrained(directory / role, safe_serialization=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    meta = {
        "key": world_key(directory),
        "recipe": recipe.to_dict(),
        "recipe_version": RECIPE_VERSION,
        "recipe_hash": cache_key(recipe),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": command,
        "accuracies": accuracies,
        "n_heldout": recipe.n_heldout,
        "train_seconds": train_seconds,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    write_text_atomic(directory / "world.json", json.dumps(meta, indent=2) + "\n")


def load_world(path: str | os.PathLike | None = None, verify: bool = True) -> ToyWorld:
    """Load a world from its directory; with no ``path``, the world that ships with the package.

    Args:
        path: a directory holding ``world.json``, ``tokenizer/``, ``teacher/`` and ``student/``; ``None`` = the
            shipped world (:data:`SHIPPED_WORLD_DIR`).
        verify: check that the files hash to the key recorded in ``world.json``.

    Raises:
        FileNotFoundError: when ``path`` holds no ``world.json`` or misses a model / tokenizer file.
        ValueError: when the files do not match the recorded key (a changed or corrupted world).
    """
    path = Path(path) if path is not None else SHIPPED_WORLD_DIR
    meta_file = path / "world.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"no toy world at {path} (missing world.json)")
    meta = json.loads(meta_file.read_text())
    legacy = "recipe_hash" not in meta  # a build of RECIPE_VERSION 1 code, keyed by its recipe
    actual = world_key(path) if verify or legacy else None  # hash the files once
    if legacy:
        meta["key"] = actual
    if verify and actual != meta["key"]:
        raise ValueError(
            f"toy world at {path}: its files hash to {actual}, but world.json records key {meta['key']}; "
            "the files were changed after the build (reinstall the package, or rebuild the world)"
        )
    recipe = ToyRecipe.from_dict(meta["recipe"])
    record = {k: v for k, v in meta.items() if k not in ("key", "recipe", "accuracies", "build_seconds")}
    return ToyWorld(
        recipe=recipe,
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
        teacher=_load_model(path / "teacher"),
        student=_load_model(path / "student"),
        tasks={name: TASKS[name] for name in recipe.tasks},
        datasets=_splits(recipe),
        accuracies=meta["accuracies"],
        path=path,
        key=meta["key"],
        from_cache=True,
        build_seconds=float(meta["build_seconds"]),
        record=record,
    )


def build_world(
    cache_dir: str | os.PathLike | None = None,
    recipe: ToyRecipe | None = None,
    progress: bool = True,
    command: str = "sparse_opd_peft.lab.toy.build_world",
) -> ToyWorld:
    """The toy world for ``recipe``: with no recipe, the shipped world (nothing is trained); with a recipe, the
    world it builds, trained on first use and cached afterwards.

    Args:
        cache_dir: cache root for built worlds; default :func:`default_cache_dir`. Unused for the shipped world.
        recipe: what to build; ``None`` loads the shipped world, ``ToyRecipe.tiny()`` builds in seconds,
            :func:`shipped_recipe` rebuilds the shipped world's recipe (another world: see the module docstring).
        progress: show tqdm bars while training.
        command: recorded in ``world.json`` as the command that built the world.

    Returns:
        the :class:`ToyWorld`; ``from_cache`` tells whether it was loaded rather than trained.
    """
    if recipe is None:
        return load_world()
    if not isinstance(recipe, ToyRecipe):
        raise ValueError(f"recipe must be a ToyRecipe, got {type(recipe).__name__}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(recipe)
    final = root / key
    if (final / "world.json").is_file():
        return load_world(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(root, key)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(recipe.num_threads)
        with torch.random.fork_rng(devices=[]):
            _build_into(tmp, recipe, progress, command)
        normalize_modes(tmp)  # the usual 0644 / 0755 under the umask (temp dirs and safetensors files are 0600)
        try:
            os.replace(tmp, final)
        except OSError as err:
            if not (final / "world.json").is_file():  # not a lost race: a leftover directory we did not make
                raise FileExistsError(
                    f"{final} exists but holds no world.json (not a toy world built by this code); remove it"
                ) from err
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    world = load_world(final)
    world.from_cache = False
    return world


def shipped_recipe() -> ToyRecipe:
    """The recipe the shipped world was built from (read from its ``world.json``)."""
    return ToyRecipe.from_dict(json.loads((SHIPPED_WORLD_DIR / "world.json").read_text())["recipe"])
