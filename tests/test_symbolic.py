"""Symbolic string tasks (cotlab_jax.symbolic): the reference's chat text, fields and splits."""

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from collections import Counter

import jinja2
import numpy as np
import pytest
from test_train import ROOT

from cotlab_jax import symbolic

MIXED = symbolic.SymbolicConfig(
    n_input_choices=(3, 4, 5),
    n_parent_choices=(1, 2, 3),
    chain_length_choices=(1, 3, 4),
    n_example_choices=(2, 6),
    word_length=7,
    char_offset=25,
)

# The reference's chat format, transcribed from its code (core/data/symbolic/common.py and
# symbolic_data_module.py: prepare_question, prepare_cot_solution, prepare_direct_solution,
# prepare_prompt), as an oracle independent of cotlab_jax.symbolic.
REF_THINK_PREFIX = "<|im_start|>think\n"
REF_ANSWER_PREFIX = "<|im_start|>final answer\n"
REF_SYSTEM_PROMPT = f"""You are a helpful problem solver who follows instructions.

Given some examples of string transformations, you must figure out the underlying transformation rule
and apply it to the set of words in the last example.

Instructions for the response:
a. If you choose to think out loud, you must start your response with: {REF_THINK_PREFIX}.
b. The final answer must always be provided in the: {REF_ANSWER_PREFIX}\\\\boxed{{}} format.
c. You should not think or explain after providing the final answer.
"""  # noqa: E501 (the reference's line, kept whole)


def ref_question(input_words):
    return (
        "Given the input words: "
        + ", ".join(input_words)
        + ", what is the final answer after the string transformations?"
    )


def ref_cot_solution(intermediate_words, answer_word):
    reasoning = REF_THINK_PREFIX
    for i in range(len(intermediate_words)):
        reasoning += f"Step {i + 1}: {intermediate_words[i]}\n"
    reasoning += f"{REF_ANSWER_PREFIX}\\boxed{{{answer_word}}}"
    return reasoning


def ref_direct_solution(answer_word):
    return f"{REF_ANSWER_PREFIX}\\boxed{{{answer_word}}}"


def ref_conversation(raw_examples, examples_per_prompt, cot_flags):
    """prepare_prompt's conversation, its per-example coin flips given as `cot_flags`."""
    conversation = [{"role": "system", "content": REF_SYSTEM_PROMPT}]
    examples = raw_examples[:examples_per_prompt]
    for i in range(len(examples)):
        cot = ref_cot_solution(examples[i]["intermediate_words"], examples[i]["answer_word"])
        direct = ref_direct_solution(examples[i]["answer_word"])
        conversation.extend(
            [
                {"role": "user", "content": ref_question(examples[i]["input_words"])},
                {"role": "assistant", "content": cot if cot_flags[i] else direct},
            ]
        )
    return conversation


# Qwen2.5-Instruct's chat template (the reference's tokenizer), its branches for plain
# system/user/assistant messages (no tools), rendered with jinja2 as the tokenizer would.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen25_text(conversation):
    return (
        jinja2.Environment()
        .from_string(QWEN25_TEMPLATE)
        .render(messages=conversation, add_generation_prompt=False)
    )


def chain_oracle(input_words, adj_list, offset):
    """Chain words computed letter by letter, without cotlab_jax."""
    words = list(input_words)
    for parents in adj_list:
        halves = "".join(words[p][len(words[p]) // 2 :] for p in sorted(parents))
        words.append("".join(chr(ord("a") + (ord(ch) - ord("a") + offset) % 26) for ch in halves))
    return words[len(input_words) :]


# A fixed raw task (word length 4, offset 1), its chain words worked out by hand:
# y0 = shift(cd + op), y1 = shift(gh + kl) for adj [[0, 3], [1, 2], [0, 4]], y2 = shift(cd + pq).
FIXED_ROW = {
    "task_id": 7,
    "examples": [
        {
            "input_words": ["abcd", "efgh", "ijkl", "mnop"],
            "intermediate_words": ["depq", "hilm"],
            "answer_word": "deqr",
            "adj_list": [[0, 3], [1, 2], [0, 4]],
        },
        {
            "input_words": ["zzzz", "yxwv", "qrst", "lmny"],
            "intermediate_words": ["aaoz", "xwtu"],
            "answer_word": "aapa",
            "adj_list": [[0, 3], [1, 2], [0, 4]],
        },
        {
            "input_words": ["kite", "moon", "star", "blue"],
            "intermediate_words": ["ufvf", "pobs"],
            "answer_word": "ufwg",
            "adj_list": [[0, 3], [1, 2], [0, 4]],
        },
    ],
}


def test_fixed_task_renders_as_the_reference():
    task = symbolic.SymbolicTask.from_json(FIXED_ROW)
    for e, example in enumerate(FIXED_ROW["examples"]):
        assert chain_oracle(example["input_words"], example["adj_list"], 1) == [
            *example["intermediate_words"],
            example["answer_word"],
        ]
        assert (
            symbolic.make_example(tuple(example["input_words"]), task.examples[e].adj_list, 1)
            == task.examples[e]
        )
    assert symbolic.SYSTEM_PROMPT == REF_SYSTEM_PROMPT
    for cot_flags in [(True, False, True), (False,), (True, True), (False, True, False)]:
        messages = symbolic.chat_messages(task, cot_flags)
        assert messages == ref_conversation(FIXED_ROW["examples"], len(cot_flags), cot_flags)
        assert symbolic.chatml_text(messages) == qwen25_text(messages)
    # The last turns of a two-example chat, spelled out.
    text = symbolic.chatml_text(symbolic.chat_messages(task, (True, False)))
    assert text.endswith(
        "<|im_start|>user\nGiven the input words: abcd, efgh, ijkl, mnop, what is the final answer "
        "after the string transformations?<|im_end|>\n<|im_start|>assistant\n<|im_start|>think\n"
        "Step 1: depq\nStep 2: hilm\n<|im_start|>final answer\n\\boxed{deqr}<|im_end|>\n"
        "<|im_start|>user\nGiven the input words: zzzz, yxwv, qrst, lmny, what is the final answer "
        "after the string transformations?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>final answer\n\\boxed{aapa}<|im_end|>\n"
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful problem solver")


@pytest.mark.parametrize("k", [None, 1, 4])
def test_generated_rows_render_as_the_reference(k):
    render = symbolic.RenderConfig(
        examples_per_prompt=k, initial_prob=0.2, final_prob=0.9, alpha=1.0
    )
    splits = symbolic.render_splits(5, 8, 4, MIXED, render)
    rows = [row.to_json() for row in splits["train"] + splits["test"]]
    assert 0 < sum(sum(r["is_cot"]) for r in rows) < sum(len(r["is_cot"]) for r in rows)
    for row in rows:
        shown = min(k or len(row["examples"]), len(row["examples"]))
        assert len(row["is_cot"]) == shown
        conversation = ref_conversation(row["examples"], shown, row["is_cot"])
        assert row["messages"] == conversation
        assert row["text"] == qwen25_text(conversation)


@pytest.mark.parametrize("config", [symbolic.SymbolicConfig(), MIXED])
def test_every_chain_word_follows_its_parents(config):
    seen = Counter()
    for task in symbolic.generate(11, range(40), config):
        adj = task.examples[0].adj_list
        assert task.n in config.n_input_choices and task.m in config.n_parent_choices
        assert task.c in config.chain_length_choices and task.k in config.n_example_choices
        assert len(adj) == task.c
        for j, parents in enumerate(adj):
            assert list(parents) == sorted(set(parents)) and len(parents) == task.m
            assert all(0 <= p < task.n + j for p in parents)
        for example in task.examples:
            assert example.adj_list == adj
            assert len(example.input_words) == task.n
            assert all(
                re.fullmatch(f"[a-z]{{{config.word_length}}}", w) for w in example.input_words
            )
            assert chain_oracle(example.input_words, adj, config.char_offset) == [
                *example.intermediate_words,
                example.answer_word,
            ]
        seen[(task.n, task.m, task.c)] += 1
    assert len(seen) > 5 or config == symbolic.SymbolicConfig()


def test_first_chain_word_parents_are_uniform_pairs():
    config = symbolic.SymbolicConfig(n_example_choices=(1,), chain_length_choices=(1,))
    counts = Counter(t.examples[0].adj_list[0] for t in symbolic.generate(0, range(1200), config))
    assert set(counts) == set(itertools.combinations(range(4), 2))
    # 200 expected per pair, standard deviation ~12.9.
    assert all(abs(count - 200) < 60 for count in counts.values()), counts


def test_cot_probability_index_schemes():
    def rows(order, split="train"):
        render = symbolic.RenderConfig(alpha=1.0, recipe_order=order)
        return symbolic.render_splits(2, 20, 10, symbolic.SymbolicConfig(), render)[split]

    # The reference's: every p(i) once (i the row's index in task order), then rows shuffled.
    for split, first, size in (("train", 0, 20), ("test", 20, 10)):
        shuffled = rows("shuffled", split)
        ids = [row.task.task_id for row in shuffled]
        assert sorted(ids) == list(range(first, first + size)) and ids != sorted(ids)
        assert [row.cot_example_prob for row in shuffled] == [(t - first) / size for t in ids]
    curriculum = rows("curriculum")
    assert [row.task.task_id for row in curriculum] == list(range(20))
    assert [row.cot_example_prob for row in curriculum] == [i / 20 for i in range(20)]
    random = rows("random")
    assert [row.task.task_id for row in random] == list(range(20))
    probs = [row.cot_example_prob for row in random]
    assert all(p * 20 == round(p * 20) and 0 <= p < 1 for p in probs)
    assert len(set(probs)) < 20  # 20 uniform draws of 20 indices repeat (p > 0.99999)
    # Each example is CoT with its row's probability: 20 rows x 40 examples, mean p = 0.475.
    flags = np.array([row.is_cot for row in curriculum], float)
    assert abs(flags.mean() - 0.475) < 0.1
    assert flags[:5].mean() < 0.3 < 0.7 < flags[-5:].mean()
    # The defaults (alpha = 0) make every example CoT.
    default = symbolic.render_splits(2, 5, 1, symbolic.SymbolicConfig(), symbolic.RenderConfig())
    assert all(all(row.is_cot) and row.cot_example_prob == 1.0 for row in default["train"])


def test_raw_tasks_round_trip_and_render_at_any_k(tmp_path):
    config, seed = symbolic.SymbolicConfig(), 9
    render = symbolic.RenderConfig(initial_prob=0.5, final_prob=0.5)
    rows = symbolic.render_splits(seed, 6, 2, config, render)["train"]
    path = str(tmp_path / "train.jsonl")
    symbolic.write_jsonl(path, rows)
    with open(path) as f:
        written = [json.loads(line) for line in f]
    assert written == [row.to_json() for row in rows]
    assert set(written[0]) == {
        "task_id",
        "examples",
        "messages",
        "text",
        "cot_example_prob",
        "is_cot",
    }
    assert set(written[0]["examples"][0]) == {
        "input_words",
        "intermediate_words",
        "answer_word",
        "adj_list",
    }
    tasks = symbolic.read_tasks(path)
    assert tasks == symbolic.generate(seed, range(6), config)
    assert all(task.k == 40 for task in tasks)
    # Rendering the stored tasks at K = 2 keeps all 40 examples and shows the first two; the
    # coin flips are a prefix of the K = 40 ones.
    short = symbolic.render_split(tasks, seed, dataclasses.replace(render, examples_per_prompt=2))
    by_id = {row.task.task_id: row for row in rows}
    for row in short:
        full = by_id[row.task.task_id]
        assert row.task == full.task and row.is_cot == full.is_cot[:2]
        assert row.messages == full.messages[:5]
        assert row.messages == ref_conversation(row.to_json()["examples"], 2, row.is_cot)


def test_command_line_writes_both_splits_from_one_stream(tmp_path):
    args = [
        sys.executable,
        "-m",
        "cotlab_jax.symbolic",
        f"--out_dir={tmp_path}",
        "--n_train_tasks=3",
        "--n_test_tasks=2",
        "--examples_per_prompt=2",
        "--chain_length=2,3",
        "--alpha=1",
    ]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    config = symbolic.SymbolicConfig(chain_length_choices=(2, 3))
    render = symbolic.RenderConfig(examples_per_prompt=2, alpha=1.0)
    expected = symbolic.render_splits(42, 3, 2, config, render)  # seed 42 by default
    for split, ids in (("train", {0, 1, 2}), ("test", {3, 4})):
        lines = (tmp_path / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [r.to_json() for r in expected[split]]
        assert {json.loads(line)["task_id"] for line in lines} == ids


def test_bad_flags_give_one_line(tmp_path):
    base = [
        sys.executable,
        "-m",
        "cotlab_jax.symbolic",
        f"--out_dir={tmp_path}",
        "--n_train_tasks=2",
        "--n_test_tasks=1",
    ]
    for flag, message in (
        (
            "--n_parents=3",
            "symbolic.n_parent_choices=(3,): expected parents per chain word "
            "m <= input words n for every draw (the smallest n choice is 2)",
        ),
        (
            "--examples_per_prompt=41",
            "symbolic.examples_per_prompt=41: expected at most the examples stored per task (40)",
        ),
        (
            f"--tokenizer={tmp_path}/none",
            f"symbolic.tokenizer='{tmp_path}/none': expected a "
            f"directory holding a saved transformers tokenizer",
        ),
    ):
        extra = ["--n_inputs=2"] if flag == "--n_parents=3" else []
        bad = subprocess.run(
            base + extra + [flag], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert (bad.returncode, bad.stderr.strip()) == (1, message)
    assert not list(tmp_path.iterdir())


def test_invalid_configs_name_the_field():
    with pytest.raises(ValueError, match=r"symbolic.word_length=1: expected an integer >= 2"):
        symbolic.SymbolicConfig(word_length=1)
    with pytest.raises(ValueError, match=r"symbolic.n_parent_choices=\(2, 5\): expected parents"):
        symbolic.SymbolicConfig(n_input_choices=(4, 6), n_parent_choices=(2, 5))
    with pytest.raises(ValueError, match="recipe_order='reverse'"):
        symbolic.RenderConfig(recipe_order="reverse")
    with pytest.raises(ValueError, match=r"symbolic.examples_per_prompt=0: expected a positive"):
        symbolic.RenderConfig(examples_per_prompt=0)
    with pytest.raises(ValueError, match=r"symbolic.n_test_tasks=0: expected a positive integer"):
        symbolic.split_task_ids(10, 0)


def test_a_tokenizer_chat_template_renders_the_text(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    def save(template, name):
        model = tokenizers.models.WordLevel({"[UNK]": 0, "step": 1}, unk_token="[UNK]")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer(model), unk_token="[UNK]"
        )
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    rows = symbolic.render_splits(1, 3, 1, MIXED, symbolic.RenderConfig(alpha=1.0))["train"]
    qwen = symbolic.tokenizer_chat_text(save(QWEN25_TEMPLATE, "qwen"))
    plain = symbolic.tokenizer_chat_text(
        save("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", "plain")
    )
    for row in rows:
        assert qwen(row.messages) == row.text == qwen25_text(row.messages)
        assert plain(row.messages) == "".join(
            f"[{m['role']}] {m['content']}\n" for m in row.messages
        )
    rendered = symbolic.render_split([r.task for r in rows], 1, symbolic.RenderConfig(), plain)
    assert rendered[0].text.startswith("[system] You are a helpful problem solver")
    with pytest.raises(ValueError, match="expected a tokenizer with a chat_template"):
        symbolic.tokenizer_chat_text(save(None, "no_template"))
