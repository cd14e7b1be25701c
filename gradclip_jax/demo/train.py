"""Training of the demo: every strategy and every seed in one compiled program.

`train_step` is the plain NNX step a user copies: ``@nnx.jit``, `nnx.value_and_grad`,
``nnx.Optimizer(model, optax.chain(strategy, optimizer), wrt=nnx.Param)``. `train` runs the same
two pieces (`loss_and_grads`, then ``optimizer.update``) for all strategies and seeds at once:
models and optimizers are split into graph definitions and states with a leading seed axis, the
gradients of all strategies' models are computed by one ``jax.vmap``-ed network, and one
``jax.jit`` program scans ``chunk`` steps. Compiling the recurrent network once instead of once
per strategy is what keeps the demo within minutes on a CPU.

A seed whose loss or parameters stop being finite, or whose optimizer state holds a NaN, is
marked as diverged at that step and frozen (its updates are masked); the other seeds and
strategies go on. An infinite threshold in a clipper's state ("never clip") is not a
divergence.

References:
  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, 2013.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradclip_jax
from gradclip_jax._diagnostics import gradient_health, hidden_state_gradient_norms
from gradclip_jax.demo.models import DeepRNN
from gradclip_jax.demo.tasks import Task, get_task


class StrategySpec(NamedTuple):
    """How the demo builds a strategy from gradclip_jax.

    Attributes:
      factory: name of the gradclip_jax factory.
      kwargs: its keyword arguments (empty: the library's defaults).
      global_threshold: whether the threshold in its statistics bounds the global gradient norm
        (and can be drawn against it), rather than a per-element, per-leaf or per-unit quantity.
    """

    factory: str
    kwargs: dict[str, float | None]
    global_threshold: bool


# A strategy is offered only once its factory exists in gradclip_jax: a new one is one line.
# Each is configured as a user would, with the paper's or the library's defaults, except
# zclip. Its default cap (max_norm=1.0) sits below this model's gradient norms all run, so the
# cap alone decided and zclip repeated global_norm. With a cap of 10 the cap guards the
# warm-up (25 steps, norms up to 1e8 here); the z-score's statistics start from those norms,
# and with the paper's decay of 0.97 they outlived the run (the z-score set the threshold at
# 0% of steps at lengths 80 to 120); with decay 0.9 they fade within a few hundred steps.
STRATEGY_SPECS: dict[str, StrategySpec] = {
    "value": StrategySpec("clip_by_value", {"max_abs": 0.1}, False),
    "global_norm": StrategySpec("clip_by_global_norm", {"max_norm": 1.0}, True),
    "leaf_norm": StrategySpec("clip_by_leaf_norm", {"max_norm": 0.5}, False),
    "agc": StrategySpec("agc", {"clipping": 0.02}, False),
    "autoclip": StrategySpec("autoclip", {}, True),
    "zclip": StrategySpec("zclip", {"max_norm": 10.0, "decay": 0.9}, True),
    "adaptive_clip": StrategySpec("adaptive_clip", {}, True),
    "adagc": StrategySpec("adagc", {}, False),
    "quantile": StrategySpec("quantile_clip", {}, True),
}
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "adam": optax.adam,
}
SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def available_strategies() -> dict[str, Callable[[], optax.GradientTransformation]]:
    """The strategies this installation offers, ``"none"`` (no clipping) first."""
    strategies: dict[str, Callable[[], optax.GradientTransformation]] = {"none": optax.identity}
    for name, spec in STRATEGY_SPECS.items():
        if hasattr(gradclip_jax, spec.factory):
            strategies[name] = functools.partial(getattr(gradclip_jax, spec.factory), **spec.kwargs)
    return strategies


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything that defines one demo run. The defaults are the README's configuration."""

    task: str = "adding"
    length: int = 100
    depth: int = 2
    hidden: int = 32
    cell: str = "rnn"
    activation: str = "relu"
    recurrent_init: str = "identity"
    recurrent_scale: float = 1.0
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    schedule: str = "cosine"  # or "constant"; cosine decays to 0 over `steps`
    steps: int = 1500
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] | None = None  # None: every available strategy
    chunk: int = 100  # steps per call of the compiled program (progress-bar granularity)
    eval_batch_size: int = 500
    fast_compile: bool = False  # XLA optimisation level 0: ~2x faster compile, ~4x slower steps

    def build_model(self, seed: int | jax.Array) -> DeepRNN:
        """The model of ``seed``: every strategy starts from the same initialisation."""
        task = get_task(self.task)
        return DeepRNN(
            task.input_size,
            self.hidden,
            task.output_size,
            depth=self.depth,
            cell=self.cell,  # type: ignore[arg-type]
            activation=self.activation,  # type: ignore[arg-type]
            recurrent_init=self.recurrent_init,  # type: ignore[arg-type]
            recurrent_scale=self.recurrent_scale,
            rngs=nnx.Rngs(jax.random.key(seed)),
        )

    def transformation(self, strategy: str) -> optax.GradientTransformation:
        """``optax.chain(<clipping strategy>, <optimizer>)``."""
        strategies = available_strategies()
        if strategy not in strategies:
            raise ValueError(f"unknown strategy {strategy!r}; available: {list(strategies)}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected {list(OPTIMIZERS)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected {SCHEDULES}.")
        learning_rate: float | optax.Schedule = self.learning_rate
        if self.schedule == "cosine":
            learning_rate = optax.cosine_decay_schedule(self.learning_rate, self.steps)
        return optax.chain(strategies[strategy](), OPTIMIZERS[self.optimizer](learning_rate))

    def compile(self, fn: Callable[..., Any], *args: Any) -> Callable[..., Any]:
        """``jax.jit(fn)`` compiled ahead of time for ``args``, honouring ``fast_compile``."""
        options = {"xla_backend_optimization_level": 0} if self.fast_compile else None
        return jax.jit(fn).lower(*args).compile(compiler_options=options)

    def strategy_names(self) -> tuple[str, ...]:
        """The strategies to train, in table order."""
        return self.strategies or tuple(available_strategies())


def loss_and_grads(
    model: DeepRNN, task: Task, inputs: jax.Array, targets: jax.Array
) -> tuple[jax.Array, nnx.State]:
    """The task loss of ``model`` on one batch and its gradient with respect to the parameters."""
    return nnx.value_and_grad(lambda m: task.loss(m(inputs), targets))(model)


@nnx.jit(static_argnames="task")
def train_step(
    model: DeepRNN, optimizer: nnx.Optimizer, task: Task, inputs: jax.Array, targets: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Updates ``model`` in place; returns the loss and the gradient norm before clipping.

    Examples:
      >>> import optax
      >>> from flax import nnx
      >>> import gradclip_jax
      >>> from gradclip_jax.demo.tasks import TASKS
      >>> task = TASKS["adding"]
      >>> model = DeepRNN(task.input_size, 8, task.output_size, rngs=nnx.Rngs(0))
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.01))
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> inputs, targets = task.sample(jax.random.key(0), 16, 20)
      >>> loss, grad_norm = train_step(model, optimizer, task, inputs, targets)
      >>> sorted(gradclip_jax.stats(optimizer.opt_state))[0]
      'clip_by_global_norm/clip_count'
    """
    loss, grads = loss_and_grads(model, task, inputs, targets)
    optimizer.update(model, grads)
    return loss, gradclip_jax.global_norm(grads)


@dataclasses.dataclass
class TrainingRun:
    """Outcome of training every strategy on every seed.

    Attributes:
      names: the strategies, in table order.
      history: per strategy, per-step records of shape ``(seeds, steps)``: ``loss`` (NaN once
        diverged), ``grad_norm`` (global norm before clipping) and every `gradclip_jax.stats`
        entry of the strategy.
      diverged_at: per strategy, ``(seeds,)`` step of the first non-finite loss or parameter,
        -1 for seeds that never diverged.
      model_graphdef: graph definition of the model.
      initial_models: the models' initial state (leading seed axis), shared by all strategies.
      final_models: per strategy, the final model state (leading seed axis).
      compile_seconds: time to compile the training program.
      train_seconds: time to run it.
    """

    names: tuple[str, ...]
    history: dict[str, dict[str, np.ndarray]]
    diverged_at: dict[str, np.ndarray]
    model_graphdef: nnx.GraphDef
    initial_models: nnx.State
    final_models: dict[str, nnx.State]
    compile_seconds: float
    train_seconds: float


def init_models(config: DemoConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model graph definition and the initial model state of every seed (leading axis)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: config.build_model(0)))
    seeds = jnp.asarray(config.seeds, jnp.uint32)
    return graphdef, jax.jit(jax.vmap(lambda s: nnx.state(config.build_model(s))))(seeds)


def init_optimizer(
    model_graphdef: nnx.GraphDef, models: nnx.State, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)`` for every seed of ``models``."""

    def build(model_state: nnx.State) -> nnx.Optimizer:
        return nnx.Optimizer(nnx.merge(model_graphdef, model_state), tx, wrt=nnx.Param)

    first = jax.tree.map(lambda x: x[0], models)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(first)))
    return graphdef, jax.vmap(lambda m: nnx.state(build(m)))(models)


def _is_float(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _all_finite(tree: Any) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _no_nan(tree: Any) -> jax.Array:
    checks = [~jnp.any(jnp.isnan(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _where(keep: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``keep`` else ``old``, leaf by leaf; ``keep`` indexes the leading axes."""

    def select(n: jax.Array, o: jax.Array) -> jax.Array:
        return jnp.where(keep.reshape(keep.shape + (1,) * (n.ndim - keep.ndim)), n, o)

    return jax.tree.map(select, new, old)


def _step(config, model_graphdef, optimizer_graphdefs, carry, step, seed_key):
    """One step of every strategy for one seed; updates are masked once a strategy diverged.

    ``models`` holds every strategy's model stacked on a leading axis, so that the network and
    the gradient norm are compiled once, batched over strategies; only the optimizers (whose
    states differ) are unrolled per strategy.
    """
    models, optimizers, diverged_at = carry
    task = get_task(config.task)
    inputs, targets = task.sample(
        jax.random.fold_in(seed_key, step), config.batch_size, config.length
    )

    def strategy_grads(model_state: nnx.State) -> tuple[jax.Array, nnx.State]:
        return loss_and_grads(nnx.merge(model_graphdef, model_state), task, inputs, targets)

    losses, grads = jax.vmap(strategy_grads)(models)
    grad_norms = jax.vmap(gradclip_jax.global_norm)(grads)
    updated_models, updated_optimizers, finite, stats = [], [], [], []
    for i, optimizer_graphdef in enumerate(optimizer_graphdefs):
        select = functools.partial(jax.tree.map, lambda x, i=i: x[i])
        # copy=True: the update mutates Variables, and the old state must survive the mask.
        model = nnx.merge(model_graphdef, select(models), copy=True)
        optimizer = nnx.merge(optimizer_graphdef, optimizers[i], copy=True)
        optimizer.update(model, select(grads))
        updated_models.append(nnx.state(model))
        updated_optimizers.append(nnx.state(optimizer))
        # An infinite threshold in a clipper's state is legitimate ("never clip", e.g. during
        # a warm-up); only NaN there means the state is broken.
        finite.append(_no_nan(updated_optimizers[-1]))
        stats.append(gradclip_jax.stats(optimizer.opt_state, missing="ignore"))
    updated = jax.tree.map(lambda *x: jnp.stack(x), *updated_models)
    finite = jnp.stack(finite) & jnp.isfinite(losses) & jax.vmap(_all_finite)(updated)
    active = (diverged_at < 0) & (step < config.steps)
    keep = active & finite
    optimizers = tuple(
        _where(keep[i], new, old)
        for i, (new, old) in enumerate(zip(updated_optimizers, optimizers))
    )
    diverged_at = jnp.where(active & ~finite, step, diverged_at)
    records = []
    for i, strategy_stats in enumerate(stats):
        record = {"loss": losses[i], "grad_norm": grad_norms[i], **strategy_stats}
        # Steps after a divergence (or past the end) record NaN: nothing was trained there.
        records.append(
            {k: jnp.where(active[i], v, jnp.nan) if _is_float(v) else v for k, v in record.items()}
        )
    return (_where(keep, updated, models), optimizers, diverged_at), tuple(records)


def train(config: DemoConfig, on_chunk: Callable[[int], None] | None = None) -> TrainingRun:
    """Trains every strategy of ``config`` on every seed, same initialisations and same data.

    Args:
      config: the demo configuration.
      on_chunk: called with the number of steps done after each compiled chunk (progress bars).

    Returns:
      A `TrainingRun`.
    """
    names = config.strategy_names()
    model_graphdef, models = init_models(config)
    optimizer_graphdefs, optimizers = zip(
        *(init_optimizer(model_graphdef, models, config.transformation(n)) for n in names)
    )
    step = functools.partial(_step, config, model_graphdef, optimizer_graphdefs)
    chunk = min(config.chunk, config.steps)

    def chunk_one_seed(carry, seed_key, start):
        return jax.lax.scan(lambda c, s: step(c, s, seed_key), carry, start + jnp.arange(chunk))

    run_chunk = jax.vmap(chunk_one_seed, in_axes=(0, 0, None))
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(config.seeds, jnp.uint32))
    diverged_at = jnp.full((len(config.seeds), len(names)), -1, jnp.int32)
    # Every strategy trains its own copy, stacked on axis 1 (axis 0 is the seed).
    stacked = jax.tree.map(lambda x: jnp.stack([x] * len(names), axis=1), models)
    carry = (stacked, optimizers, diverged_at)
    start_time = time.perf_counter()
    compiled = config.compile(run_chunk, carry, seed_keys, 0)
    compile_seconds = time.perf_counter() - start_time
    records = []
    start_time = time.perf_counter()
    for start in range(0, config.steps, chunk):
        carry, record = compiled(carry, seed_keys, start)
        records.append(record)
        if on_chunk is not None:
            jax.block_until_ready(carry)
            on_chunk(min(chunk, config.steps - start))
    jax.block_until_ready(carry)
    train_seconds = time.perf_counter() - start_time
    records = jax.device_get(records)
    history = {
        name: {
            key: np.concatenate([r[i][key] for r in records], axis=1)[:, : config.steps]
            for key in records[0][i]
        }
        for i, name in enumerate(names)
    }
    return TrainingRun(
        names=names,
        history=history,
        diverged_at=dict(zip(names, np.asarray(carry[2]).T)),
        model_graphdef=model_graphdef,
        initial_models=models,
        final_models={
            name: jax.tree.map(lambda x, i=i: x[:, i], carry[0]) for i, name in enumerate(names)
        },
        compile_seconds=compile_seconds,
        train_seconds=train_seconds,
    )


def evaluate(
    config: DemoConfig, model_graphdef: nnx.GraphDef, models: list[nnx.State]
) -> list[dict[str, Any]]:
    """Held-out loss and gradient diagnostics of every seed of every model state given.

    All states go through one compiled program, on one fixed evaluation batch that no seed
    trained on.

    Args:
      config: the demo configuration.
      model_graphdef: the model's graph definition.
      models: model states, each with a leading seed axis.

    Returns:
      For each state: ``loss`` ``(seeds,)``; ``hidden_grad_norms`` ``(seeds, depth, length)``,
      the norm of dL/dh_t per layer and step (`gradclip_jax.hidden_state_gradient_norms`);
      ``health``, a `gradclip_jax.GradientHealth` of the evaluation-batch gradient with a
      leading seed axis.
    """
    task = get_task(config.task)
    # Training draws from fold_in(key(seed), step): the evaluation key is outside that family.
    inputs, targets = task.sample(jax.random.key(2**31 - 1), config.eval_batch_size, config.length)

    def one(model_state: nnx.State) -> dict[str, Any]:
        model = nnx.merge(model_graphdef, model_state)
        loss, grads = loss_and_grads(model, task, inputs, targets)
        hidden_grad_norms = hidden_state_gradient_norms(
            lambda delta: task.loss(model(inputs, delta), targets),
            jnp.zeros(model.perturbation_shape(config.length, config.eval_batch_size)),
            time_axis=1,
            keep_axes=(0,),
        )
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        health = gradient_health(nnx.to_pure_dict(grads), params)
        return {"loss": loss, "hidden_grad_norms": hidden_grad_norms, "health": health}

    stacked = jax.tree.map(lambda *x: jnp.stack(x), *models)
    # lax.map, not vmap, over the states: memory for one state's seeds at a time.
    program = config.compile(lambda s: jax.lax.map(jax.vmap(one), s), stacked)
    results = jax.device_get(program(stacked))
    return [jax.tree.map(lambda x, i=i: x[i], results) for i in range(len(models))]
