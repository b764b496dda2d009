"""A tiny run for end-to-end tests: compiles and trains in seconds on a CPU."""

from cotlab_jax import config as config_lib


def get_config(arg=None):
    config = config_lib.get_base_config()
    config.data.update(
        dict(
            vocab_size=32,
            n_dims=6,
            n_input_choices=(2, 3),
            n_parent_choices=(2,),
            chain_length_choices=(2,),
            n_example_choices=(3, 4),
            prompt_strategy=arg or "cot",
        )
    )
    if config.data.prompt_strategy == "hybrid_special_token":
        config.data.cot_example_prob_recipe_info = dict(
            type="power_law", initial_prob=0.0, final_prob=1.0, alpha=1.0, scale=1.0
        )
    config.model.update(
        dict(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            dtype="float32",
        )
    )
    config.train.update(
        dict(
            n_tasks=8 * 40, batch_size=8, lr=3e-3, log_every_n_steps=5, checkpoint_every_n_steps=10
        )
    )
    config.eval.update(
        dict(n_eval_tasks=24, eval_every_n_steps=20, batch_size=16, max_pred_tokens=12)
    )
    config.log.progress_bar = False
    return config
