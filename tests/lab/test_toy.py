"""Tests of the embedded toy world (tiny recipe only, so the file runs in well under a minute on 2 cores)."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from sparse_opd_peft.lab.toy import (
    CHARS,
    EOS_TOKEN,
    TASKS,
    ModelSpec,
    ToyRecipe,
    build_model,
    build_tokenizer,
    build_world,
    cache_key,
    evaluate_accuracy,
    get_task,
    greedy_completions,
    lr_factor,
    make_splits,
    tokenize_sft,
    world_key,
)

# ---------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_save_load(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "123+045=9750" + CHARS
    for t in (tok, loaded):
        ids = t(text)["input_ids"]
        assert ids[0] == t.bos_token_id and len(ids) == len(text) + 1  # one token per character
        assert t.decode(ids, skip_special_tokens=True) == text
        assert t.decode(ids) == "<bos>" + text
        assert t.padding_side == "left"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert len(loaded) == len(tok) == 4 + len(CHARS)
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)


def test_tokenizer_special_tokens_and_padding():
    tok = build_tokenizer()
    assert tok("12" + EOS_TOKEN, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("1"), 6, 2]
    assert tok("a")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]
    batch = tok(["1+2=", "123+456="], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"][0].tolist() == [0] * 4 + [1] * 5
    assert (batch["input_ids"][0, :4] == tok.pad_token_id).all()


# ---------------------------------------------------------------- tasks


def test_task_answers_and_verifier():
    add, sub = get_task("add"), get_task("sub")
    assert add.answer("123+456=") == "9750"  # 579 -> 0579 reversed
    assert add.answer("999+999=") == "8991"  # 1998 reversed
    assert sub.answer("500-001=") == "994"  # 499 reversed
    assert add.verify("123+456=", "9750") == 1.0
    assert add.verify("123+456=", "9750" + EOS_TOKEN) == 1.0
    assert add.verify("123+456=", "9750" + EOS_TOKEN + "12<pad><pad>") == 1.0  # garbage after EOS is ignored
    assert add.verify("123+456=", "9751" + EOS_TOKEN) == 0.0
    assert add.verify("123+456=", "97501" + EOS_TOKEN) == 0.0
    assert add.verify("123+456=", " 9750") == 0.0  # exact match, no stripping
    assert add.verify("123+456=", "") == 0.0
    assert add.rewards(["123+456=", "000+000="], ["9750", "0000"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="not a 'add' prompt"):
        add.verify("123-456=", "0")
    with pytest.raises(ValueError):
        add.rewards(["123+456="], [])


def test_make_example_is_consistent():
    rng = random.Random(0)
    for task in TASKS.values():
        for _ in range(200):
            prompt, answer = task.make_example(rng)
            assert task.verify(prompt, answer + EOS_TOKEN) == 1.0
            assert len(answer) == task.answer_width and len(prompt) == 8
            a, b = int(prompt[:3]), int(prompt[4:7])
            expected = a + b if task.name == "add" else a - b
            assert int(answer[::-1]) == expected


def test_unknown_task_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown toy task 'mul'.*add"):
        get_task("mul")
    with pytest.raises(ValueError):
        make_splits("add", -1, 10)
    with pytest.raises(ValueError):
        make_splits("add", 10**6, 10)


def test_splits_disjoint_columns_deterministic():
    for name in TASKS:
        dd = make_splits(name, 300, 100, seed=3)
        assert set(dd) == {"train", "heldout"}
        assert dd["train"].column_names == ["prompt", "answer"] and len(dd["train"]) == 300
        assert len(dd["heldout"]) == 100
        train, held = set(dd["train"]["prompt"]), set(dd["heldout"]["prompt"])
        assert len(train) == 300 and len(held) == 100 and not train & held
        assert all(
            get_task(name).answer(p) == a for p, a in zip(dd["train"]["prompt"], dd["train"]["answer"], strict=True)
        )
        assert make_splits(name, 300, 100, seed=3)["heldout"]["prompt"] == dd["heldout"]["prompt"]
        assert make_splits(name, 300, 100, seed=4)["heldout"]["prompt"] != dd["heldout"]["prompt"]


# ---------------------------------------------------------------- models and evaluation


def test_tokenize_sft_masks_prompt():
    tok = build_tokenizer()
    ids, mask, labels = tokenize_sft(tok, ["123+456=", "500-001="], ["9750", "994"])
    assert ids.shape == mask.shape == labels.shape == (2, 14) and ids.dtype == torch.long
    assert (labels[0, :9] == -100).all() and labels[0, 9:].tolist() == ids[0, 9:].tolist()
    assert labels[0, -1] == tok.eos_token_id
    assert mask[1].tolist() == [1] * 13 + [0] and labels[1, -1] == -100 and ids[1, -1] == tok.pad_token_id


def test_lr_schedule_and_spec_validation():
    spec = ModelSpec(16, 1, 2, 1, 8, 32, steps=10, lr=1e-3, warmup_steps=2, decay_steps=20)
    assert lr_factor(0, spec) == 0.5 and lr_factor(2, spec) == 1.0 and lr_factor(11, spec) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_heads"):
        ModelSpec(16, 1, 3, 2, 8, 32, steps=1, lr=1e-3).validate()
    with pytest.raises(ValueError, match="lr"):
        ModelSpec(16, 1, 2, 1, 8, 32, steps=1, lr=0.0).validate()
    with pytest.raises(ValueError, match="decay_steps"):
        ModelSpec(16, 1, 2, 1, 8, 32, steps=10, lr=1e-3, decay_steps=5).validate()


def test_bad_recipe_values():
    with pytest.raises(ValueError, match="unknown toy task"):
        ToyRecipe(tasks=("add", "div"))
    with pytest.raises(ValueError, match="duplicates"):
        ToyRecipe(tasks=("add", "add"))
    with pytest.raises(ValueError, match="non-empty"):
        ToyRecipe(tasks=())
    with pytest.raises(ValueError, match="batch_size"):
        ToyRecipe(batch_size=0)
    with pytest.raises(ValueError, match="num_threads"):
        ToyRecipe(num_threads=0)
    with pytest.raises(ValueError, match="student.hidden_size"):
        replace(ToyRecipe.tiny(), student=replace(ToyRecipe.tiny().student, hidden_size=0))


class _Oracle(torch.nn.Module):
    """Duck-typed causal LM whose ``generate`` writes the right (or a wrong) answer, then EOS, then pads."""

    def __init__(self, tokenizer, task, wrong: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.task, self.wrong = tokenizer, task, wrong

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids in input_ids.tolist():
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            answer = self.task.answer(prompt)
            if self.wrong:
                answer = answer[:-1] + str((int(answer[-1]) + 1) % 10)
            new = self.tok(answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            rows.append(ids + (new + [self.tok.pad_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_evaluate_accuracy_perfect_and_zero():
    tok = build_tokenizer()
    task = get_task("add")
    ds = make_splits(task, 10, 50, seed=1)["heldout"]
    assert evaluate_accuracy(_Oracle(tok, task), tok, ds, "add", batch_size=16) == 1.0
    assert evaluate_accuracy(_Oracle(tok, task, wrong=True), tok, ds, task, batch_size=16) == 0.0
    # A real Qwen3 whose lm_head is zero always emits token 0 (<pad>): accuracy 0, completions are pads.
    model = build_model(ToyRecipe.tiny().student, tok, seed=0)
    torch.nn.init.zeros_(model.lm_head.weight)
    assert evaluate_accuracy(model, tok, ds, "add", batch_size=16) == 0.0
    assert greedy_completions(model, tok, ds["prompt"][:2], max_new_tokens=3) == ["<pad>" * 3] * 2
    with pytest.raises(ValueError, match="prompt"):
        evaluate_accuracy(model, tok, ds.remove_columns("prompt"), "add")


def test_evaluate_accuracy_peft_wrapped():
    from peft import LoraConfig, get_peft_model

    tok = build_tokenizer()
    model = build_model(ToyRecipe.tiny().student, tok, seed=0)
    ds = make_splits("sub", 10, 20, seed=1)["heldout"]
    plain = greedy_completions(model, tok, ds["prompt"], max_new_tokens=4)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True))
    assert greedy_completions(peft_model, tok, ds["prompt"], max_new_tokens=4) == plain  # LoRA B = 0: same output
    acc = evaluate_accuracy(peft_model, tok, ds, "sub")
    assert 0.0 <= acc <= 1.0


# ---------------------------------------------------------------- world build and cache


@pytest.fixture(scope="module")
def tiny_worlds(tmp_path_factory):
    recipe = ToyRecipe.tiny()
    root_a, root_b = tmp_path_factory.mktemp("cache_a"), tmp_path_factory.mktemp("cache_b")
    threads = torch.get_num_threads()
    built = build_world(root_a, recipe, progress=False)
    assert torch.get_num_threads() == threads  # the build's thread count is restored
    t0 = time.perf_counter()
    loaded = build_world(root_a, recipe, progress=False)
    load_seconds = time.perf_counter() - t0
    rebuilt = build_world(root_b, recipe, progress=False)
    return recipe, built, loaded, load_seconds, rebuilt


def _same_weights(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_world_build_and_cache_hit(tiny_worlds):
    recipe, built, loaded, load_seconds, _ = tiny_worlds
    assert not built.from_cache and loaded.from_cache
    assert load_seconds < 5.0
    assert built.key == loaded.key == world_key(built.path) and built.path == loaded.path
    assert built.path.name == cache_key(recipe)  # cached under the recipe's hash, keyed by its files
    assert not built.shipped and built.record["command"] == "sparse_opd_peft.lab.toy.build_world"
    for name in ("teacher", "student", "tokenizer"):
        assert (built.path / name).is_dir()
    assert (built.path / "world.json").is_file()
    assert not [p for p in built.path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert _same_weights(built.teacher, loaded.teacher) and _same_weights(built.student, loaded.student)
    assert loaded.accuracies == built.accuracies and set(built.accuracies["teacher"]) == set(recipe.tasks)
    assert set(built.datasets) == set(recipe.tasks) == set(built.tasks)
    assert built.datasets["add"]["heldout"]["prompt"] == loaded.datasets["add"]["heldout"]["prompt"]
    assert len(built.datasets["sub"]["heldout"]) == recipe.n_heldout
    assert loaded.teacher.config.tie_word_embeddings is False and not loaded.teacher.training
    assert loaded.tokenizer("1+2=")["input_ids"] == built.tokenizer("1+2=")["input_ids"]
    assert _same_weights(loaded.load_student(), built.student)


def test_world_build_is_deterministic(tiny_worlds):
    _, built, _, _, rebuilt = tiny_worlds
    assert built.path != rebuilt.path and not rebuilt.from_cache
    assert built.key == rebuilt.key  # same machine, same recipe: the same files
    assert _same_weights(built.teacher, rebuilt.teacher)
    assert _same_weights(built.student, rebuilt.student)
    assert built.accuracies == rebuilt.accuracies


def test_cache_key_changes_with_recipe():
    base = ToyRecipe.tiny()
    keys = {
        cache_key(base),
        cache_key(replace(base, seed=1)),
        cache_key(replace(base, tasks=("add",))),
        cache_key(replace(base, student=replace(base.student, steps=11))),
        cache_key(replace(base, teacher=replace(base.teacher, lr=1e-3))),
    }
    assert len(keys) == 5
    assert cache_key(ToyRecipe.tiny()) == cache_key(base)
    assert cache_key(ToyRecipe()) != cache_key(base)
    assert ToyRecipe.from_dict(base.to_dict()) == base


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from sparse_opd_peft.lab.toy import default_cache_dir

    monkeypatch.setenv("SPARSE_OPD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SPARSE_OPD_CACHE")
    assert default_cache_dir().parts[-2:] == ("sparse_opd_peft", "toy")
    with pytest.raises(ValueError, match="ToyRecipe"):
        build_world(tmp_path, recipe={"seed": 0})


def test_build_world_without_recipe_is_the_shipped_world(tmp_path):
    from sparse_opd_peft.lab.toy import SHIPPED_WORLD_DIR

    world = build_world(tmp_path)  # nothing trained, nothing written to the cache
    assert world.shipped and world.path == SHIPPED_WORLD_DIR and world.from_cache
    assert list(tmp_path.iterdir()) == []


def test_toy_module_cli_shows_the_shipped_world_and_refuses_bad_flags(capsys, tmp_path):
    from sparse_opd_peft.lab.toy.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert f"shipped world {world_key(__import__('sparse_opd_peft.lab.toy', fromlist=['x']).SHIPPED_WORLD_DIR)}" in out
    assert "built by: python -m sparse_opd_peft." in out and "student  add" in out
    with pytest.raises(SystemExit) as err:
        main(["--export", str(tmp_path / "x")])
    assert err.value.code == 2 and "--export needs --rebuild" in capsys.readouterr().err


def test_run_config_holds_an_opd_config_and_routes_changes():
    """``ToyRunConfig`` repeats no ``OPDConfig`` field: the knobs live in ``cfg.opd`` (the toy recipe by default),
    ``with_`` routes ``task`` / ``save_every`` to the run and every other name to the ``OPDConfig``, so a trainer
    knob ToyRunConfig never names (``temperature``) reaches the run."""
    from dataclasses import fields

    from sparse_opd_peft.lab.toy import ToyRunConfig
    from sparse_opd_peft.lab.toy.runs import TOY_OPD_RECIPE, toy_opd_config
    from sparse_opd_peft.opd import OPDConfig

    assert [f.name for f in fields(ToyRunConfig)] == ["task", "opd", "save_every"]
    cfg = ToyRunConfig()
    assert cfg.opd == OPDConfig(**TOY_OPD_RECIPE) == toy_opd_config()
    assert (cfg.opd.steps, cfg.opd.batch_size, cfg.opd.warmup_steps, cfg.opd.lr) == (250, 64, 10, 1e-3)
    changed = cfg.with_(task="sub", save_every=5, temperature=0.7, seed=3, loss="mix", num_generations=2)
    assert (changed.task, changed.save_every) == ("sub", 5)
    assert changed.opd == replace(cfg.opd, temperature=0.7, seed=3, loss="mix", num_generations=2)
    assert changed.opd.seed == 3 and changed.opd.temperature == 0.7
    assert cfg.opd.temperature == 1.0  # the original is unchanged
    assert ToyRunConfig.from_dict(changed.to_dict()) == changed
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['progress'\]"):
        cfg.with_(progress=False)
    with pytest.raises(ValueError, match="OPDConfig.num_generations"):  # validated by OPDConfig itself
        cfg.with_(loss="rlvr")
    with pytest.raises(TypeError, match="ToyRunConfig.opd must be an OPDConfig"):
        ToyRunConfig(opd={"lr": 1e-3})
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cfg.nope  # noqa: B018


def test_opd_config_of_a_run_sets_the_world_s_completion_length_and_the_snapshots(tmp_path):
    """``opd_config`` = the run's OPDConfig with ``max_new_tokens`` from the task and snapshots only with a
    directory; nothing else changes."""
    from sparse_opd_peft.lab.toy import ToyRunConfig, load_world
    from sparse_opd_peft.lab.toy.runs import opd_config

    world = load_world()
    cfg = ToyRunConfig(task="add", save_every=7).with_(lr=3e-4, temperature=0.9)
    width = world.tasks["add"].answer_width
    assert opd_config(world, cfg) == replace(cfg.opd, max_new_tokens=width + 2)
    with_dir = opd_config(world, cfg, tmp_path)
    assert (with_dir.save_every, with_dir.checkpoint_dir) == (7, str(tmp_path))
    with pytest.raises(ValueError, match="task 'mul' is not in the toy world"):
        opd_config(world, cfg.with_(task="mul"))
