"""Exploding gradients in deep vanilla RNNs, with and without clipping (``gradclip-demo``).

Needs the ``examples`` extra (Flax, matplotlib, tqdm). Modules: `models` (Flax NNX RNN and
LSTM), `tasks` (adding and temporal-order problems), `train` (the vmapped, compiled training
loop), `report` and `plots` (table, JSON, Markdown, PNGs), `experiment` (`run_demo`) and `cli`.
"""

from gradclip_jax.demo.experiment import run_demo
from gradclip_jax.demo.train import DemoConfig, available_strategies

__all__ = ["DemoConfig", "available_strategies", "run_demo"]
