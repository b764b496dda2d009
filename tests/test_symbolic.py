"""Symbolic string tasks (cotlab_jax.symbolic, DESIGN 1.7)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from test_train import ROOT

from cotlab_jax import symbolic

MIXED = symbolic.SymbolicConfig(
    n_input_choices=(3, 4, 5), n_parent_choices=(1, 2, 3), chain_length_choices=(1, 3, 4),
    n_example_choices=(2, 6), word_length=7, char_offset=25, alpha=1.0, scale=1.0)


def shifted(letter, offset):
    return chr(ord("a") + (ord(letter) - ord("a") + offset) % 26)


@pytest.mark.parametrize("config", [symbolic.SymbolicConfig(), MIXED])
def test_every_chain_word_follows_its_parents(config):
    seen_m = set()
    for task in symbolic.generate(30, seed=4, config=config):
        assert task.m == min(task.m, task.n) and len(task.adj) == task.c
        seen_m.add(task.m)
        for j, parents in enumerate(task.adj):
            assert len(set(parents)) == len(parents) == task.m
            assert all(0 <= p < task.n + j for p in parents)
        for inputs, chain in zip(task.inputs, task.chain, strict=True):
            assert len(inputs) == task.n and len(chain) == task.c
            assert all(re.fullmatch(f"[a-z]{{{config.word_length}}}", w) for w in inputs)
            words = list(inputs) + list(chain)
            for j, parents in enumerate(task.adj):
                halves = "".join(words[p][len(words[p]) // 2:] for p in sorted(parents))
                assert chain[j] == "".join(shifted(ch, config.char_offset) for ch in halves)
    assert len(seen_m) > 1 or config == symbolic.SymbolicConfig()


def test_parent_order_is_random_but_words_use_ascending_order():
    tasks = list(symbolic.generate(40, seed=1, config=symbolic.SymbolicConfig()))
    assert any(list(p) != sorted(p) for t in tasks for p in t.adj)
    assert symbolic.chain_word(["abcdef", "uvwxyz"], 1) == "efgyza"
    assert symbolic.shift_word("xyz", 27) == "yza"


def test_rendering_matches_the_documented_format():
    task = symbolic.sample_task(seed=3, index=5, n_tasks=10, config=MIXED)
    chat = symbolic.render_chat(task)
    assert chat[0] == dict(role="system", content=symbolic.SYSTEM_PROMPT)
    assert [m["role"] for m in chat[1:]] == ["user", "assistant"] * task.k
    for e in range(task.k):
        question, answer = chat[1 + 2 * e]["content"], chat[2 + 2 * e]["content"]
        assert question == "Input: " + " ".join(task.inputs[e])
        lines = answer.split("\n")
        assert lines[-1] == "\\boxed{" + task.chain[e][-1] + "}"
        steps = [f"Step {i + 1}: {w}" for i, w in enumerate(task.chain[e][:-1])]
        assert lines[:-1] == (steps if task.is_cot[e] else [])


def test_cot_probability_follows_the_recipe():
    def cot_fraction(config, n=200):
        tasks = list(symbolic.generate(n, seed=0, config=config))
        return np.mean([np.mean(t.is_cot) for t in tasks]), tasks

    assert cot_fraction(symbolic.SymbolicConfig(n_example_choices=(5,)))[0] == 1.0
    assert cot_fraction(symbolic.SymbolicConfig(n_example_choices=(5,), alpha=np.inf))[0] == 0.0
    curriculum = symbolic.SymbolicConfig(n_example_choices=(5,), alpha=1.0,
                                         recipe_order="curriculum")
    fraction, tasks = cot_fraction(curriculum)
    assert [t.cot_prob for t in tasks[:3]] == [0.0, 1 / 200, 2 / 200]
    assert 0.35 < fraction < 0.65


def test_tasks_are_a_function_of_seed_and_index(tmp_path):
    config = MIXED
    first = list(symbolic.generate(12, seed=7, config=config))
    assert first == list(symbolic.generate(12, seed=7, config=config))
    assert first != list(symbolic.generate(12, seed=8, config=config))
    # Without the shuffled recipe draw, task i does not depend on how many tasks are made.
    curriculum = symbolic.SymbolicConfig(alpha=np.inf, recipe_order="curriculum")
    assert (list(symbolic.generate(3, seed=7, config=curriculum))[:2]
            == list(symbolic.generate(2, seed=7, config=curriculum)))


def test_command_line_writes_one_chat_per_line(tmp_path):
    out = tmp_path / "chats.jsonl"
    args = [sys.executable, "-m", "cotlab_jax.symbolic", "--n_tasks=3", f"--out={out}",
            "--seed=2", "--n_examples=4", "--chain_length=2,3"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    config = symbolic.SymbolicConfig(n_example_choices=(4,), chain_length_choices=(2, 3))
    assert [json.loads(line) for line in lines] == [
        symbolic.render_chat(t) for t in symbolic.generate(3, seed=2, config=config)]
    bad = subprocess.run(args[:-1] + ["--n_parents=0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip() == ("symbolic.n_parent_choices=(0,): expected a non-empty tuple "
                                  "of positive integers")


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match=r"symbolic.word_length=1: expected an integer >= 2"):
        symbolic.SymbolicConfig(word_length=1)
    with pytest.raises(ValueError, match="recipe_order='random'"):
        symbolic.SymbolicConfig(recipe_order="random")
