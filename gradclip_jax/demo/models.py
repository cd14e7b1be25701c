"""Deep recurrent networks in Flax NNX for the exploding-gradient demo.

Two cells share one interface: a vanilla (Elman) cell whose recurrent matrix is initialised at a
chosen scale, so that its spectral radius (and with it the growth or decay of gradients through
time) is a flag; and an LSTM for contrast. `DeepRNN` stacks cells, runs each layer over the whole
sequence with `jax.lax.scan` and reads the answer out of the top layer's last hidden state.

Every model accepts an additive perturbation ``delta`` of shape
``(depth, length, batch, hidden)`` on its hidden states. At ``delta = 0`` the output is unchanged
and the gradient of the loss with respect to ``delta`` is exactly dL/dh_t for every layer and
step, which is what `gradclip_jax.hidden_state_gradient_norms` measures.

References:
  Hochreiter and Schmidhuber, `Long short-term memory
  <https://doi.org/10.1162/neco.1997.9.8.1735>`_, 1997.

  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, 2013.

  Le, Jaitly and Hinton, `A simple way to initialize recurrent networks of rectified linear units
  <https://arxiv.org/abs/1504.00941>`_, 2015.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

Activation = Literal["tanh", "relu"]
RecurrentInit = Literal["normal", "orthogonal", "identity"]
CellKind = Literal["rnn", "lstm"]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"tanh": jnp.tanh, "relu": jax.nn.relu}
RECURRENT_INITS: tuple[str, ...] = ("normal", "orthogonal", "identity")
CELLS: tuple[str, ...] = ("rnn", "lstm")


def recurrent_matrix(key: jax.Array, hidden: int, init: RecurrentInit, scale: float) -> jax.Array:
    """Returns a ``(hidden, hidden)`` recurrent matrix whose spectral radius is about ``scale``.

    Args:
      key: PRNG key.
      hidden: number of hidden units.
      init: ``"normal"`` draws i.i.d. N(0, scale^2 / hidden) entries (spectral radius close to
        ``scale`` for large ``hidden``, circular law); ``"orthogonal"`` is ``scale`` times a random
        orthogonal matrix (every singular value equals ``scale``); ``"identity"`` is ``scale``
        times the identity, the IRNN initialisation of Le et al. (2015).
      scale: the spectral radius to aim for. Above 1 the linearised dynamics amplify
        perturbations over time, which is where gradients explode (Pascanu et al., 2013).

    Returns:
      A float32 array of shape ``(hidden, hidden)``.

    Examples:
      >>> import jax
      >>> w = recurrent_matrix(jax.random.key(0), 4, "orthogonal", 1.5)
      >>> print(f"{float(jax.numpy.linalg.svd(w, compute_uv=False).max()):.2f}")
      1.50
    """
    if init == "identity":
        return scale * jnp.eye(hidden, dtype=jnp.float32)
    if init == "orthogonal":
        return jax.nn.initializers.orthogonal(scale)(key, (hidden, hidden), jnp.float32)
    if init == "normal":
        return scale / jnp.sqrt(hidden) * jax.random.normal(key, (hidden, hidden), jnp.float32)
    raise ValueError(f"recurrent_matrix: init={init!r}; expected one of {RECURRENT_INITS}.")


class VanillaCell(nnx.Module):
    """Elman cell ``h_t = act(x_t W_in + h_{t-1} W_rec + b)``.

    Args:
      in_features: input size.
      hidden: number of hidden units.
      activation: ``"tanh"`` or ``"relu"``.
      recurrent_init: see `recurrent_matrix`.
      recurrent_scale: spectral radius of the initial recurrent matrix.
      rngs: NNX random streams for the initialisation.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        *,
        activation: Activation = "tanh",
        recurrent_init: RecurrentInit = "orthogonal",
        recurrent_scale: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"VanillaCell: activation={activation!r}; expected one of {tuple(ACTIVATIONS)}."
            )
        self.activation = activation
        self.hidden = hidden
        input_init = jax.nn.initializers.lecun_normal()
        self.input_kernel = nnx.Param(input_init(rngs.params(), (in_features, hidden)))
        self.recurrent_kernel = nnx.Param(
            recurrent_matrix(rngs.params(), hidden, recurrent_init, recurrent_scale)
        )
        self.bias = nnx.Param(jnp.zeros((hidden,), jnp.float32))

    def __call__(self, inputs: jax.Array, delta: jax.Array) -> jax.Array:
        """Maps ``inputs (length, batch, in)`` to the hidden states ``(length, batch, hidden)``."""
        act = ACTIVATIONS[self.activation]
        # The input projection has no time dependence: one large matmul outside the scan.
        drive = inputs @ self.input_kernel[...] + self.bias[...][None, None, :]
        w_rec = self.recurrent_kernel[...]

        def step(h: jax.Array, drive_and_delta: tuple[jax.Array, jax.Array]):
            drive_t, delta_t = drive_and_delta
            h = act(drive_t + h @ w_rec) + delta_t
            return h, h

        h0 = jnp.zeros(drive.shape[1:], drive.dtype)
        _, states = jax.lax.scan(step, h0, (drive, delta))
        return states


class LSTMCell(nnx.Module):
    """Standard LSTM cell (forget-gate bias initialised to 1), for contrast with `VanillaCell`.

    Args:
      in_features: input size.
      hidden: number of hidden units.
      rngs: NNX random streams for the initialisation.
    """

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.hidden = hidden
        self.input_kernel = nnx.Param(
            jax.nn.initializers.lecun_normal()(rngs.params(), (in_features, 4 * hidden))
        )
        self.recurrent_kernel = nnx.Param(
            jnp.concatenate(
                [recurrent_matrix(rngs.params(), hidden, "orthogonal", 1.0) for _ in range(4)],
                axis=1,
            )
        )
        forget_bias = jnp.zeros((4, hidden), jnp.float32).at[1].set(1.0)
        self.bias = nnx.Param(forget_bias.reshape(4 * hidden))

    def __call__(self, inputs: jax.Array, delta: jax.Array) -> jax.Array:
        """Maps ``inputs (length, batch, in)`` to the hidden states ``(length, batch, hidden)``."""
        drive = inputs @ self.input_kernel[...] + self.bias[...][None, None, :]
        w_rec = self.recurrent_kernel[...]

        def step(carry: tuple[jax.Array, jax.Array], drive_and_delta):
            c, h = carry
            drive_t, delta_t = drive_and_delta
            i, f, g, o = jnp.split(drive_t + h @ w_rec, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c) + delta_t
            return (c, h), h

        zeros = jnp.zeros((drive.shape[1], self.hidden), drive.dtype)
        _, states = jax.lax.scan(step, (zeros, zeros), (drive, delta))
        return states


class DeepRNN(nnx.Module):
    """A stack of recurrent cells with a linear read-out of the top layer's last hidden state.

    Args:
      in_features: input size per time step.
      hidden: hidden units per layer.
      out_features: output size.
      depth: number of stacked layers (>= 1).
      cell: ``"rnn"`` (vanilla) or ``"lstm"``.
      activation: vanilla-cell nonlinearity, ``"tanh"`` or ``"relu"`` (ignored by the LSTM).
      recurrent_init: vanilla-cell recurrent initialisation, see `recurrent_matrix`.
      recurrent_scale: spectral radius of the vanilla cells' initial recurrent matrices.
      rngs: NNX random streams for the initialisation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = DeepRNN(2, 4, 1, depth=2, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((7, 3, 2))).shape  # inputs are (length, batch, features)
      (3, 1)
      >>> model.perturbation_shape(length=7, batch=3)
      (2, 7, 3, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        depth: int = 1,
        cell: CellKind = "rnn",
        activation: Activation = "tanh",
        recurrent_init: RecurrentInit = "orthogonal",
        recurrent_scale: float = 1.0,
        rngs: nnx.Rngs,
    ) -> None:
        if depth < 1:
            raise ValueError(f"DeepRNN: depth={depth}; expected an integer >= 1.")
        if cell not in CELLS:
            raise ValueError(f"DeepRNN: cell={cell!r}; expected one of {CELLS}.")
        self.hidden = hidden
        sizes = [in_features] + [hidden] * (depth - 1)
        if cell == "lstm":
            self.layers = nnx.List([LSTMCell(size, hidden, rngs=rngs) for size in sizes])
        else:
            self.layers = nnx.List(
                [
                    VanillaCell(
                        size,
                        hidden,
                        activation=activation,
                        recurrent_init=recurrent_init,
                        recurrent_scale=recurrent_scale,
                        rngs=rngs,
                    )
                    for size in sizes
                ]
            )
        self.readout = nnx.Linear(hidden, out_features, rngs=rngs)

    def perturbation_shape(self, length: int, batch: int) -> tuple[int, int, int, int]:
        """Shape ``(depth, length, batch, hidden)`` of the ``delta`` accepted by `__call__`."""
        return (len(self.layers), length, batch, self.hidden)

    def __call__(self, inputs: jax.Array, delta: jax.Array | None = None) -> jax.Array:
        """Maps ``inputs (length, batch, in)`` to outputs ``(batch, out)``.

        Args:
          inputs: time-major input sequence.
          delta: optional additive perturbation of every layer's hidden states, shape
            `perturbation_shape`; zero (the default) leaves the model unchanged.
        """
        length, batch = inputs.shape[:2]
        if delta is None:
            delta = jnp.zeros(self.perturbation_shape(length, batch), inputs.dtype)
        states = inputs
        for layer, layer_delta in zip(self.layers, delta):
            states = layer(states, layer_delta)
        return self.readout(states[-1])
