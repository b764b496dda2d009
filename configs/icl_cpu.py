"""In-context learning on a CPU: a packed CoT/standard pair on tasks with a fresh DAG per task,
where the examples carry what the model needs (each chain step's parent), so answer accuracy
rises with the number of in-context examples.

The task: three inputs, a chain of three tokens with ONE parent each, drawn afresh for every
task (`ablation_fixed_dag=False`), one token processor H shared by all tasks (a pool of one),
V=32, K=8. Chain token j is g(parent), g(a) the token nearest to act(H E[a]): one fixed map the
model learns from the data, applied to a parent it must read off the examples (which input or
earlier chain token produced y_j there). CoT prompts show every step; standard prompts show only
the answer, a composition of g with itself over a parent path that the examples reveal only
through their answers.

Measured (README): CoT answer accuracy 0.283 with one example and 0.637 with all eight, standard
0.477; the search that led here is in the README.

`python -m cotlab_jax.main --config=configs/icl_cpu.py --workdir=runs/icl_cpu`
"""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    del arg
    config = config_lib.get_base_config()
    config.data.update(
        dict(
            vocab_size=32,
            n_dims=10,
            n_input_choices=(3,),
            n_parent_choices=(1,),
            chain_length_choices=(3,),
            n_example_choices=(8,),
            prompt_strategy="cot",
            ablation_fixed_dag=False,
            ablation_fixed_H=True,
            num_unique_H=1,
        )
    )
    config.model.update(
        dict(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=32 * 1500,
            batch_size=32,
            lr=2e-3,
            warmup_steps=100,
            lr_schedule="cosine",
            log_every_n_steps=100,
            checkpoint_every_n_steps=500,
        )
    )
    config.eval.update(
        dict(n_eval_tasks=512, eval_every_n_steps=500, batch_size=256, example_counts="all")
    )
    config.sweep.update(
        dict(
            name="icl_cpu", axes=(("data.prompt_strategy", ("cot", "standard")),), packing="padded"
        )
    )  # standard prompts are shorter: left-padded
    return config
