"""Synthetic long-range tasks of the exploding-gradient literature, generated from a PRNG key.

Each task is a `Task`: a sampler ``sample(key, batch, length) -> (inputs, targets)`` with
time-major inputs ``(length, batch, features)``, a loss, the loss of the best constant predictor
(``baseline_loss``: a model that learned nothing about the sequence) and the loss below which we
call the task solved (``success_loss``).

References:
  Hochreiter and Schmidhuber, `Long short-term memory
  <https://doi.org/10.1162/neco.1997.9.8.1735>`_, 1997.

  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, 2013.

  Le, Jaitly and Hinton, `A simple way to initialize recurrent networks of rectified linear units
  <https://arxiv.org/abs/1504.00941>`_, 2015.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic sequence task.

    Attributes:
      name: the task's command-line name.
      input_size: features per time step.
      output_size: model outputs per sequence.
      baseline_loss: expected loss of the best constant prediction.
      success_loss: loss below which the task counts as solved.
      sample: ``(key, batch, length) -> (inputs (length, batch, input_size), targets)``.
      loss: ``(outputs (batch, output_size), targets) -> scalar`` mean loss.
    """

    name: str
    input_size: int
    output_size: int
    baseline_loss: float
    success_loss: float
    sample: Callable[[jax.Array, int, int], tuple[jax.Array, jax.Array]]
    loss: Callable[[jax.Array, jax.Array], jax.Array]


def sample_adding(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Samples the adding problem.

    Each step carries a value drawn from U(0, 1) and a marker; exactly two steps are marked, one
    in the first half of the sequence and one in the second half, and the target is the sum of the
    two marked values. Predicting the constant 1 gives the baseline MSE Var(u1 + u2) = 1/6 ~ 0.167;
    a model that recovers only one of the two values reaches 1/12 ~ 0.083.

    Args:
      key: PRNG key.
      batch: number of sequences.
      length: sequence length (>= 1; with ``length == 1`` both markers fall on step 0).

    Returns:
      ``inputs`` of shape ``(length, batch, 2)`` (value, marker) and ``targets`` ``(batch, 1)``.

    Examples:
      >>> import jax
      >>> x, y = sample_adding(jax.random.key(0), batch=3, length=10)
      >>> x.shape, y.shape
      ((10, 3, 2), (3, 1))
      >>> x[:, :, 1].sum(axis=0)  # two markers per sequence
      Array([2., 2., 2.], dtype=float32)
    """
    value_key, first_key, second_key = jax.random.split(key, 3)
    values = jax.random.uniform(value_key, (length, batch))
    half = length // 2
    first = jax.random.randint(first_key, (batch,), 0, max(half, 1))
    second = jax.random.randint(second_key, (batch,), half, length)
    steps = jnp.arange(length)[:, None]
    markers = ((steps == first[None, :]) | (steps == second[None, :])).astype(jnp.float32)
    targets = jnp.sum(values * markers, axis=0)[:, None]
    return jnp.stack([values, markers], axis=-1), targets


def sample_temporal_order(key: jax.Array, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Samples the temporal-order problem of Hochreiter and Schmidhuber, as run by Pascanu et al.

    Every step shows a one-hot symbol out of six. Distractor symbols C, D, E, F fill the sequence;
    at one step in [10%, 20%) of the sequence and one in [50%, 60%) the symbol is A or B. The
    target is which of the four orders (AA, AB, BA, BB) occurred. Uniform guessing gives the
    baseline cross-entropy ln 4 ~ 1.386; recovering only one of the two symbols gives ln 2 ~ 0.693.

    Args:
      key: PRNG key.
      batch: number of sequences.
      length: sequence length (>= 1; short sequences squeeze the two windows together).

    Returns:
      ``inputs`` of shape ``(length, batch, 6)`` and integer class ``targets`` ``(batch,)``.

    Examples:
      >>> import jax
      >>> x, y = sample_temporal_order(jax.random.key(0), batch=4, length=20)
      >>> x.shape, y.shape
      ((20, 4, 6), (4,))
      >>> bool(((y >= 0) & (y < 4)).all())
      True
    """
    distractor_key, symbol_key, first_key, second_key = jax.random.split(key, 4)
    symbols = jax.random.randint(distractor_key, (length, batch), 2, 6)
    relevant = jax.random.randint(symbol_key, (2, batch), 0, 2)

    def window(start: float, stop: float) -> tuple[int, int]:
        low = min(int(start * length), length - 1)
        return low, max(int(stop * length), low + 1)

    first = jax.random.randint(first_key, (batch,), *window(0.1, 0.2))
    second = jax.random.randint(second_key, (batch,), *window(0.5, 0.6))
    steps = jnp.arange(length)[:, None]
    symbols = jnp.where(steps == first[None, :], relevant[0][None, :], symbols)
    symbols = jnp.where(steps == second[None, :], relevant[1][None, :], symbols)
    return jax.nn.one_hot(symbols, 6), 2 * relevant[0] + relevant[1]


def mean_squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean squared error over the batch."""
    return jnp.mean(jnp.square(outputs - targets))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# A task counts as solved below 30% of its baseline loss. Both tasks need two distant inputs,
# and a model that recovered only one of them perfectly sits at exactly half the baseline (1/12
# and ln 2, see the samplers): a loss below 0.3 x baseline needs information about both.
SUCCESS_FRACTION_OF_BASELINE = 0.3

TASKS: dict[str, Task] = {
    "adding": Task(
        name="adding",
        input_size=2,
        output_size=1,
        baseline_loss=1.0 / 6.0,
        success_loss=SUCCESS_FRACTION_OF_BASELINE / 6.0,
        sample=sample_adding,
        loss=mean_squared_error,
    ),
    "temporal_order": Task(
        name="temporal_order",
        input_size=6,
        output_size=4,
        baseline_loss=math.log(4.0),
        success_loss=SUCCESS_FRACTION_OF_BASELINE * math.log(4.0),
        sample=sample_temporal_order,
        loss=cross_entropy,
    ),
}


def get_task(name: str) -> Task:
    """Returns the task called ``name`` (a key of `TASKS`), with a helpful error otherwise."""
    if name not in TASKS:
        raise ValueError(f"get_task: unknown task {name!r}; expected one of {sorted(TASKS)}.")
    return TASKS[name]
