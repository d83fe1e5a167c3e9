"""The embedded offline toy world: arithmetic tasks with verifiers, a character tokenizer, tiny Qwen3 models.

Quick start::

    from sparse_opd_peft.lab.toy import build_world, evaluate_accuracy
    world = build_world()            # the world that ships with the package: loads in a second, trains nothing
    ds = world.datasets["add"]["heldout"]
    evaluate_accuracy(world.student, world.tokenizer, ds, "add")

``python -m sparse_opd_peft.lab.toy`` prints the shipped world's key and build record; ``--rebuild`` trains its recipe
again and prints both worlds' accuracies side by side.
"""

from .evaluate import evaluate_accuracy, greedy_completions
from .models import ModelSpec, build_model, lr_factor, tokenize_sft, train_sft
from .runs import ToyRunConfig, heldout_accuracy, opd_run
from .tasks import TASKS, Task, get_task, make_splits, reward_verifiers
from .tokenizer import BOS_TOKEN, CHARS, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer
from .world import (
    RECIPE_VERSION,
    SHIPPED_WORLD_DIR,
    ToyRecipe,
    ToyWorld,
    build_world,
    cache_key,
    default_cache_dir,
    load_world,
    shipped_recipe,
    world_key,
)

__all__ = [
    "ToyRunConfig",
    "heldout_accuracy",
    "opd_run",
    "BOS_TOKEN",
    "CHARS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "RECIPE_VERSION",
    "SHIPPED_WORLD_DIR",
    "shipped_recipe",
    "world_key",
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
    "reward_verifiers",
    "tokenize_sft",
    "train_sft",
]
