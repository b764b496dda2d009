"""Knowledge distillation from a teacher into a student of another size or depth.

    python -m cotlab_jax.distill --teacher=runs/X --config=configs/distill.py[:stage] \\
        --workdir=runs/Y [--teacher_step=latest|N] [--config.distill.kl_weight=...]

The teacher is a run of this lab, or a Hugging Face Llama directory (`config.json` +
`model.safetensors`: `cotlab_jax.export`'s output, or `save_pretrained`'s) with the task it
was trained on given as a config file: `--teacher=HF_DIR --task_config=configs/<file>.py[:arg]`.

The student is an ordinary run: its config is the distillation config (`model`, `train`, `eval`,
`distill`) with the teacher run's `data` and `seed`, so it learns the teacher's task
distribution from the same world and is evaluated on the same frozen eval set. Its run directory,
checkpoints, metrics, evaluation and results are a training run's (`cotlab_jax.train`'s loop runs
the distillation step instead of the train step); `teacher.json` adds the teacher's evaluation on
that eval set. The teacher's parameters sit on the student's mesh, frozen (never donated).

Each step draws its batch on device (`data.sample_batch`, as training does) and is one of:

- word level (stage 1): loss = (1 - w) CE + w T^2 KL(p_teacher^T || p_student^T) over the tokens
  that carry loss, p^T = softmax(logits / T), w = `distill.kl_weight`, T = `distill.temperature`.
  Both terms are means over those tokens; the metrics log them apart (`ce`, `kl`, window means
  over the steps that have them: an on-policy step has no CE).
- on policy (stage 2): the student samples a continuation of each task's query (its last
  example's CoT and answer; temperature `distill.sample_temperature`, the paper's 0.8-0.9) with
  the KV-cache loop of `decode.decode_loop`; teacher and student then score prompt +
  continuation and the loss is T^2 KL(teacher || student) over the generated tokens only.

Against the paper (Behdin et al., arXiv 2502.14305): its two stages are word-level distillation
with the forward KL, KL(teacher || student) summed over the vocabulary at every token, then
on-policy distillation with the same forward KL on the student's own samples (temperature
0.8-0.9). The direction, the per-token form and the stages are the paper's. Its exact weighting
of the supervised term against the KL, and whether it softens both distributions by a
temperature with a T^2 factor, could not be read here (the search tool holds the paper's
abstract and summaries, not its equations): the mixture (1 - w) CE + w KL and the T^2 factor
are the classic form of Hinton et al. (2015), where T^2 keeps the KL's gradients on the scale of
the cross-entropy's as T changes. At T = 1 (the default) the T^2 factor is 1 and the loss is the
paper's forward KL mixed with the cross-entropy; w = 1 is pure distillation.

Whether step s is on policy is drawn from (seed, s) with probability `distill.on_policy_fraction`,
as is its sampling key, so a resumed run repeats exactly the steps of an uninterrupted one.
`distill.init_from` starts the student from another run's parameters (a stage-1 student for
stage 2); empty, from a fresh initialisation.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging

from cotlab_jax import (
    cli_errors,
    config_flag,
    data,
    decode,
    evaluate,
    experiment,
    export,
    losses,
    model,
    rundir,
    sharding,
    train,
)
from cotlab_jax import config as config_lib

# fold_in tag of distillation's own randomness (which steps are on policy, their samples).
DISTILL_STREAM = 17


def distill_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kl_weight=0.5,  # w in (1 - w) CE + w KL (word-level steps)
            temperature=1.0,  # T of the softened distributions
            on_policy_fraction=0.0,  # the probability that a step is on policy
            sample_temperature=0.85,  # the student's sampling temperature on policy
            init_from="",  # a run directory whose latest parameters start the student
        )
    )


def validate_distill(d) -> None:
    """Rejects an invalid `config.distill` before anything compiles."""
    for name in ("kl_weight", "on_policy_fraction"):
        config_lib.check_number(
            f"distill.{name}",
            d[name],
            lambda x: 0 <= x <= 1,
            "expected a number in [0, 1]",
            allow_inf=False,
        )
    for name in ("temperature", "sample_temperature"):
        config_lib.check_number(
            f"distill.{name}",
            d[name],
            lambda x: x > 0,
            "expected a positive number",
            allow_inf=False,
        )
    if not isinstance(d.init_from, str):
        config_lib.fail("distill.init_from", d.init_from, "expected a run directory or ''")


def _is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, export.WEIGHTS_NAME))


def teacher_task(
    path: str, task_config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The config whose task (data, seed) a student of the teacher at `path` learns: the run's
    own, or `task_config` for a Hugging Face Llama directory (which holds no task)."""
    if not os.path.isdir(path):
        raise rundir.RunError(f"teacher {path}: no such directory")
    if _is_hf_directory(path):
        if task_config is None:
            raise rundir.RunError(
                f"teacher {path} is a Hugging Face directory, which holds no task: give the "
                f"task's config too (--task_config=configs/<file>.py)"
            )
        return task_config
    sweep_index = os.path.join(path, "sweep.json")
    if os.path.exists(sweep_index) and not os.path.exists(os.path.join(path, "config.json")):
        members = sorted(
            name
            for name in os.listdir(path)
            if os.path.isdir(os.path.join(path, name, "checkpoints"))
        )
        raise rundir.RunError(
            f"teacher {path} is a sweep; pass one of its members: {', '.join(members) or 'none'}"
        )
    return rundir.load_config(path)


def load_teacher(
    path: str,
    step: int | str = "latest",
    mesh: jax.sharding.Mesh | None = None,
    task_config: ml_collections.ConfigDict | None = None,
) -> rundir.Run:
    """The teacher at `path`: a run directory of this lab (its checkpoint `step`), or a Hugging
    Face Llama directory (`config.json` + `model.safetensors`, e.g. from `cotlab_jax.export`
    or `save_pretrained`) whose task `task_config` gives; its parameters on `mesh`
    (replicated for an HF model; default one device)."""
    config = teacher_task(path, task_config)
    if not _is_hf_directory(path):
        return rundir.load_run(path, step, mesh=mesh)
    spec = data.TaskSpec.from_config(config)
    try:
        llama_config, graphdef, params = export.load_hf_model(path)
    except (ValueError, KeyError, TypeError) as error:
        raise rundir.RunError(f"teacher {path} is not a Llama this lab runs ({error})") from None
    if llama_config.vocab_size != spec.vocab_size:
        raise rundir.RunError(
            f"teacher {path} has vocab_size={llama_config.vocab_size}; its task config has "
            f"data.vocab_size={spec.vocab_size}"
        )
    if mesh is None:
        mesh = sharding.make_mesh({}, devices=jax.local_devices()[:1])
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
    return rundir.Run(
        config=config,
        spec=spec,
        graphdef=graphdef,
        params=params,
        step=0,
        world=data.make_world(data.root_keys(config.seed)["world"], spec),
        workdir=path,
    )


def student_config(
    distill_config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """The student's run config: the distillation config with the teacher's data and seed."""
    config = ml_collections.ConfigDict(distill_config.to_dict())
    config.data = ml_collections.ConfigDict(teacher_config.data.to_dict())
    config.seed = teacher_config.seed
    return config


# ---------------------------------------------------------------------------------------------
# Losses.


def shift_left(mask: jax.Array) -> jax.Array:
    """mask[:, 1:] with False appended: position t's logits predict token t + 1."""
    return jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)


def distillation_kl(
    student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, temperature: float
) -> jax.Array:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), float32, averaged over the positions
    where `mask` [B, L] is True (0 if there is none). Logits: [B, L, V]."""
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    kl = jnp.where(mask, kl, 0.0) * temperature**2
    return kl.sum() / jnp.maximum(mask.sum(), 1)


def _both_logits(
    params, teacher_params, input_ids, positions, attention_mask, graphdef, teacher_graphdef
):
    student = model.apply(graphdef, params, input_ids, positions, attention_mask)
    teacher = model.apply(teacher_graphdef, teacher_params, input_ids, positions, attention_mask)
    return student, jax.lax.stop_gradient(teacher)


def word_level_loss(params, teacher_params, batch, graphdef, teacher_graphdef, distill_cfg):
    """Stage 1's loss on a training batch, and its (cross-entropy, KL)."""
    student, teacher = _both_logits(
        params,
        teacher_params,
        batch["input_ids"],
        batch["positions"],
        batch["attention_mask"],
        graphdef,
        teacher_graphdef,
    )
    ce = losses.teacher_forced_loss(student, batch["labels"])[0]
    kl = distillation_kl(
        student, teacher, shift_left(batch["labels"] != data.IGNORE_INDEX), distill_cfg.temperature
    )
    weight = distill_cfg.kl_weight
    return (1 - weight) * ce + weight * kl, (ce, kl)


def on_policy_loss(params, teacher_params, sequence, graphdef, teacher_graphdef, distill_cfg):
    """Stage 2's loss on the student's own continuations (`on_policy_sequence`)."""
    student, teacher = _both_logits(
        params,
        teacher_params,
        sequence["input_ids"],
        sequence["positions"],
        sequence["attention_mask"],
        graphdef,
        teacher_graphdef,
    )
    kl = distillation_kl(student, teacher, sequence["loss_mask"], distill_cfg.temperature)
    return kl, (jnp.float32(jnp.nan), kl)


# ---------------------------------------------------------------------------------------------
# On-policy samples.


def sample_continuations(
    graphdef,
    params,
    prompt_ids,
    prompt_mask,
    key,
    n_new: int,
    temperature: float,
    eos_id: int | None = None,
    pad_id: int = 0,
):
    """Samples `n_new` tokens after each left-padded prompt [B, P] at `temperature`, with the
    KV-cache loop of `decode.decode_loop` (token i is drawn with `fold_in(key, i)`).

    Returns tokens [B, n_new] int32 (`pad_id` after a row's eos) and their mask [B, n_new]
    (True up to and including the row's eos).
    """

    def draw(step_logits, step):
        return jax.random.categorical(
            jax.random.fold_in(key, step), step_logits / temperature, axis=-1
        )

    tokens, lengths, _ = decode.decode_loop(
        graphdef, params, prompt_ids, prompt_mask, n_new, draw, eos_id, pad_id
    )
    return tokens, jnp.arange(n_new)[None, :] < lengths[:, None]


def generation_length(spec: data.TaskSpec, config) -> int:
    """Tokens sampled per query: the target's length (chain and answer) without special tokens,
    the evaluation's decoding budget with them (up to <eos>)."""
    return config.eval.max_pred_tokens if spec.special_tokens else spec.target_len


def on_policy_sequence(
    params, batch, key, graphdef, spec: data.TaskSpec, n_new: int, temperature: float
) -> dict:
    """Each task's query followed by the student's sampled continuation: input_ids, positions,
    attention_mask [B, Lq + n_new], and loss_mask, True at the positions whose logits predict a
    generated token."""
    eos = spec.token_id("eos") if spec.special_tokens else None
    tokens, valid = sample_continuations(
        graphdef,
        params,
        batch["query_ids"],
        batch["query_mask"],
        key,
        n_new,
        temperature,
        eos,
        spec.token_id("pad"),
    )
    query_mask = batch["query_mask"].astype(bool)
    attention_mask = jnp.concatenate([query_mask, valid], axis=1)
    generated = jnp.concatenate([jnp.zeros_like(query_mask), valid], axis=1)
    return dict(
        input_ids=jnp.concatenate([batch["query_ids"], tokens], axis=1),
        positions=model.positions_from_mask(attention_mask),
        attention_mask=attention_mask,
        loss_mask=shift_left(generated),
    )


def step_keys(seed: int, step) -> tuple[jax.Array, jax.Array]:
    """(whether step `step` is on policy: a uniform draw, its sampling key), from (seed, step)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), DISTILL_STREAM), step)
    choice_key, sample_key = jax.random.split(key)
    return jax.random.uniform(choice_key), sample_key


def distill_step(
    state,
    teacher_params,
    world,
    train_key,
    *,
    graphdef,
    teacher_graphdef,
    exp: experiment.Experiment,
):
    """One distillation step on the batch of `state["step"]`, word level or on policy."""
    cfg = exp.config.distill
    batch = experiment.sample_train_batch(state, world, train_key, exp)
    draw, sample_key = step_keys(exp.config.seed, state["step"])
    models = dict(graphdef=graphdef, teacher_graphdef=teacher_graphdef, distill_cfg=cfg)

    def word_level(params):
        return jax.value_and_grad(word_level_loss, has_aux=True)(
            params, teacher_params, batch, **models
        )

    def on_policy(params):
        sequence = on_policy_sequence(
            params,
            batch,
            sample_key,
            graphdef,
            exp.spec,
            generation_length(exp.spec, exp.config),
            cfg.sample_temperature,
        )
        return jax.value_and_grad(on_policy_loss, has_aux=True)(
            params, teacher_params, sequence, **models
        )

    params = state["params"]
    if cfg.on_policy_fraction == 0:
        (loss, (ce, kl)), grads = word_level(params)
    elif cfg.on_policy_fraction == 1:
        (loss, (ce, kl)), grads = on_policy(params)
    else:
        (loss, (ce, kl)), grads = jax.lax.cond(
            draw < cfg.on_policy_fraction, on_policy, word_level, params
        )
    return experiment.apply_gradients(state, loss, grads, batch, exp=exp, extra=dict(ce=ce, kl=kl))


def compile_distill_step(exp: experiment.Experiment, graphdef, state, teacher_graphdef):
    """The jitted distillation step: the student's state donated and kept on its shardings; the
    teacher's parameters an ordinary (never donated) argument."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        functools.partial(
            distill_step, graphdef=graphdef, teacher_graphdef=teacher_graphdef, exp=exp
        ),
        donate_argnums=0,
        out_shardings=shardings,
    )


def step_builder(teacher: rundir.Run) -> train.StepBuilder:
    """`train`'s step builder for distilling from `teacher` (loaded on the student's mesh)."""

    def build(exp: experiment.Experiment, graphdef, state, resumed: bool):
        init_from = exp.config.distill.init_from
        if init_from and not resumed:
            start = rundir.load_run(init_from, mesh=exp.mesh)
            shardings = jax.tree.map(lambda x: x.sharding, state["params"])
            if jax.tree.map(jnp.shape, start.params) != jax.tree.map(jnp.shape, state["params"]):
                raise rundir.RunError(
                    f"distill.init_from={init_from!r} holds a model of other "
                    f"shapes than config.model"
                )
            state = dict(state, params=jax.device_put(start.params, shardings))
        step = compile_distill_step(exp, graphdef, state, teacher.graphdef)
        return state, lambda state, world, train_key: step(state, teacher.params, world, train_key)

    return build


def distill(
    distill_config: ml_collections.ConfigDict,
    teacher_dir: str,
    workdir: str,
    teacher_step: int | str = "latest",
    task_config: ml_collections.ConfigDict | None = None,
) -> dict:
    """Distils the teacher in `teacher_dir` (a run, or an HF Llama directory whose task
    `task_config` gives) into the student run in `workdir` (or resumes it); returns the
    student's results with the teacher's evaluation under `teacher`."""
    if "distill" not in distill_config:
        raise config_lib.ConfigError(
            "config.distill is missing: a distillation config sets "
            "config.distill = distill.distill_defaults()"
        )
    validate_distill(distill_config.distill)
    config = student_config(distill_config, teacher_task(teacher_dir, task_config))
    exp = experiment.setup(config)  # every group validated before anything compiles
    teacher = load_teacher(teacher_dir, teacher_step, exp.mesh, task_config)
    if teacher.config.data.vocab_size != config.data.vocab_size:
        raise rundir.RunError("teacher and student vocabularies differ")
    results = train.train_and_evaluate(config, workdir, step_builder(teacher))
    if "eval" not in results:  # preempted
        return results
    eval_set = rundir.frozen_eval_set(workdir, exp)
    teacher_eval = evaluate.evaluate(
        teacher.graphdef,
        teacher.params,
        eval_set,
        exp.spec,
        batch_size=config.eval.batch_size,
        max_pred_tokens=config.eval.max_pred_tokens,
    )
    record = dict(
        workdir=os.path.abspath(teacher_dir),
        step=teacher.step,
        n_params=model.count_params(teacher.params),
        eval=teacher_eval,
    )
    if jax.process_index() == 0:
        rundir.write_json(os.path.join(workdir, "teacher.json"), record)
    return dict(results, teacher=record)


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags() -> dict:
    """The command line's flags; defined only when it runs, so that importing this module adds
    no flags to another program."""
    return dict(
        config=config_flag.define_config_flag(
            help_string="Distillation config (configs/distill.py[:stage])."
        ),
        teacher=flags.DEFINE_string("teacher", None, "The teacher's run directory."),
        teacher_step=flags.DEFINE_string(
            "teacher_step", "latest", "The teacher's checkpoint step: latest or a number."
        ),
        workdir=flags.DEFINE_string("workdir", None, "The student's run directory."),
        task_config=flags.DEFINE_string(
            "task_config", None, "An HF teacher's task: its config, configs/<file>.py[:arg]."
        ),
    )


def main(argv, flag_values: dict) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    values = {name: holder.value for name, holder in flag_values.items()}
    for name in ("config", "teacher", "workdir"):
        if values[name] is None:
            raise app.UsageError(f"--{name} is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        task_config = (
            None
            if values["task_config"] is None
            else config_flag.load_config_file(values["task_config"], "task_config")
        )
        results = distill(
            values["config"],
            values["teacher"],
            values["workdir"],
            rundir.parse_step(values["teacher_step"]),
            task_config,
        )
    except (config_lib.ConfigError, rundir.RunError) as e:
        sys.exit(f"error: {e}")
    except ValueError as e:  # a task config that does not load
        sys.exit(f"error: --task_config={values['task_config']}: {e}")
    if jax.process_index() == 0 and "eval" in results:
        print(train.summary(results, values["workdir"]))
        teacher_eval = results["teacher"]["eval"]
        print(
            f"teacher ({results['teacher']['n_params']:,} parameters): answer_acc "
            f"{teacher_eval['answer_acc']:.4g}, loss {teacher_eval['loss']:.4g}"
        )


if __name__ == "__main__":
    _FLAGS = define_flags()
    app.run(
        cli_errors.one_line(functools.partial(main, flag_values=_FLAGS)),
        flags_parser=config_flag.parse_flags,
    )
