"""The embedded offline toy world: arithmetic tasks with verifiers, a character tokenizer, tiny Qwen3 models.

Quick start::

    from sparse_opd_peft.toy import build_world, evaluate_accuracy
    world = build_world()            # minutes the first time on 2 CPU cores, seconds afterwards (cached)
    ds = world.datasets["add"]["heldout"]
    evaluate_accuracy(world.student, world.tokenizer, ds, "add")

``python -m sparse_opd_peft.toy --cache-dir DIR`` builds / loads the default world and prints a summary.
"""

from .evaluate import evaluate_accuracy, greedy_completions
from .models import ModelSpec, build_model, lr_factor, tokenize_sft, train_sft
from .runs import ToyRunConfig, heldout_accuracy, opd_run
from .tasks import TASKS, Task, get_task, make_splits
from .tokenizer import BOS_TOKEN, CHARS, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer
from .world import RECIPE_VERSION, ToyRecipe, ToyWorld, build_world, cache_key, default_cache_dir, load_world

__all__ = [
    "ToyRunConfig",
    "heldout_accuracy",
    "opd_run",
    "BOS_TOKEN",
    "CHARS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RECIPE_VERSION",
    "TASKS",
    "UNK_TOKEN",
    "ModelSpec",
    "Task",
    "ToyRecipe",
    "ToyWorld",
    "build_model",
    "build_tokenizer",
    "build_world",
    "cache_key",
    "default_cache_dir",
    "evaluate_accuracy",
    "get_task",
    "greedy_completions",
    "load_world",
    "lr_factor",
    "make_splits",
    "tokenize_sft",
    "train_sft",
]
