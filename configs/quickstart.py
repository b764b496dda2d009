"""A CPU-sized sweep, the README's main command: a small Llama learns a small task with CoT and
without it (standard prompts), the two trained together as one packed program, then a report.

The task: three inputs, a chain of four tokens with two parents each, ten examples, one token
processor H (a pool of one), 40-dimensional data embeddings, and one DAG for every task (the
reference's `ablation_fixed_dag`). From seed 42 the answer is y3 = g(x2, g(x1, g(x2, x0))), where
g(a, b) is the token nearest to act(mean(H E[a], H E[b])): it depends on all three inputs, 64^3
combinations that a direct answer must learn as one function, while each CoT step is a function
of two tokens. CoT wins by decomposing the computation. With a fresh DAG per task
(`--config.data.ablation_fixed_dag=False`) the model must also infer each step's parents from the
examples, which this 2-layer model does not learn within the budget (numbers in the README).

`python -m cotlab_jax.main --config=configs/quickstart.py --workdir=runs/quickstart`
"""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    del arg
    config = config_lib.get_base_config()
    config.data.update(
        dict(
            vocab_size=64,
            n_dims=40,
            n_input_choices=(3,),
            n_parent_choices=(2,),
            chain_length_choices=(4,),
            n_example_choices=(10,),
            prompt_strategy="cot",
            ablation_fixed_dag=True,
            ablation_fixed_H=True,
            num_unique_H=1,
        )
    )
    config.model.update(
        dict(
            num_hidden_layers=2,
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=32 * 600,
            batch_size=32,
            lr=1e-3,
            warmup_steps=100,
            lr_schedule="cosine",
            log_every_n_steps=50,
            checkpoint_every_n_steps=150,
        )
    )
    config.eval.update(
        dict(
            n_eval_tasks=512,
            eval_every_n_steps=150,
            batch_size=128,
            example_counts="all",
            analyses=True,
            analysis_tasks=128,
        )
    )
    config.sweep.update(
        dict(
            name="quickstart",
            axes=(("data.prompt_strategy", ("cot", "standard")),),
            packing="padded",
        )
    )  # standard prompts are shorter: left-padded
    return config
