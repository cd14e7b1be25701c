"""``gradclip-demo``: command-line entry point of the exploding-gradient demo."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

from gradclip_jax.demo.cliff import run_cliff
from gradclip_jax.demo.experiment import run_demo
from gradclip_jax.demo.models import ACTIVATIONS, CELLS, RECURRENT_INITS
from gradclip_jax.demo.sweep import DEFAULT_THRESHOLDS, SweepConfig, main_sweep
from gradclip_jax.demo.tasks import TASKS
from gradclip_jax.demo.train import OPTIMIZERS, SCHEDULES, DemoConfig, available_strategies


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line; every default is `DemoConfig`'s."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="gradclip-demo",
        usage="%(prog)s [-h] [options]\n       %(prog)s sweep [-h] [sweep options]",
        description="Train deep vanilla RNNs on long-range tasks with and without gradient "
        "clipping; print a results table and write results.json, results.md and PNG plots.",
        epilog="Subcommand: 'gradclip-demo sweep [flags]' trains one model per global-norm "
        "threshold in one vmapped program and plots final loss against threshold; "
        "'gradclip-demo sweep --help' lists its flags.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--task", choices=sorted(TASKS), default=defaults.task, help="synthetic task")
    add("--length", type=int, default=defaults.length, help="sequence length")
    add("--depth", type=int, default=defaults.depth, help="stacked recurrent layers")
    add("--hidden", type=int, default=defaults.hidden, help="hidden units per layer")
    add("--cell", choices=CELLS, default=defaults.cell, help="vanilla RNN or LSTM")
    add("--activation", choices=sorted(ACTIVATIONS), default=defaults.activation, help="RNN units")
    add(
        "--recurrent-init",
        choices=RECURRENT_INITS,
        default=defaults.recurrent_init,
        help="RNN recurrent matrices",
    )
    add(
        "--recurrent-scale",
        type=float,
        default=defaults.recurrent_scale,
        help="spectral radius of the initial recurrent matrices",
    )
    add("--optimizer", choices=sorted(OPTIMIZERS), default=defaults.optimizer, help="optimizer")
    add("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate")
    add(
        "--schedule",
        choices=SCHEDULES,
        default=defaults.schedule,
        help="learning-rate schedule: constant, or cosine decay to 0 over the run",
    )
    add("--steps", type=int, default=defaults.steps, help="training steps")
    add("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    add("--seeds", type=int, nargs="+", default=list(defaults.seeds), help="random seeds")
    strategies = list(available_strategies())
    add(
        "--strategies",
        nargs="+",
        choices=strategies,
        default=strategies,
        metavar="NAME",
        help=f"strategies to compare, from: {', '.join(strategies)}",
    )
    add("--out", default="demo_output", help="output folder")
    add(
        "--fast-compile",
        action="store_true",
        help="compile at XLA optimisation level 0: about 2x faster to compile, 4x slower to run",
    )
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def parse_sweep_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses ``gradclip-demo sweep ...`` flags; every default is `SweepConfig`'s."""
    defaults = SweepConfig()
    parser = argparse.ArgumentParser(
        prog="gradclip-demo sweep",
        description="Train one copy of the demo model per global-norm clipping threshold, all "
        "in one vmapped program, and plot final loss against threshold (sweep.png, sweep.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--thresholds",
        type=float,
        nargs="+",
        default=[*DEFAULT_THRESHOLDS, math.inf],
        help="global-norm thresholds ('inf' = no clipping)",
    )
    add("--task", choices=sorted(TASKS), default=defaults.task, help="synthetic task")
    add("--length", type=int, default=defaults.length, help="sequence length")
    add("--depth", type=int, default=defaults.depth, help="stacked recurrent layers")
    add("--hidden", type=int, default=defaults.hidden, help="hidden units per layer")
    add("--steps", type=int, default=defaults.steps, help="training steps")
    add("--learning-rate", type=float, default=defaults.learning_rate, help="SGD learning rate")
    add("--batch-size", type=int, default=defaults.batch_size, help="sequences per step")
    add("--seed", type=int, default=defaults.seed, help="random seed (initialisation and data)")
    add("--out", default="demo_output", help="output folder")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The `DemoConfig` of parsed ``gradclip-demo`` flags."""
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    settings["seeds"] = tuple(args.seeds)
    settings["strategies"] = tuple(args.strategies)
    return DemoConfig(**settings)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the demo with the command-line settings (``argv`` defaults to ``sys.argv``).

    ``gradclip-demo sweep ...`` runs the vmapped threshold sweep instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        a = parse_sweep_args(argv[1:])
        config = SweepConfig(
            task=a.task,
            length=a.length,
            depth=a.depth,
            hidden=a.hidden,
            steps=a.steps,
            learning_rate=a.learning_rate,
            batch_size=a.batch_size,
            seed=a.seed,
        )
        main_sweep(a.out, a.thresholds, config)
        return
    args = parse_args(argv)
    run_demo(config_from_args(args), args.out, progress=not args.no_progress)
    summary = run_cliff(args.out)
    print(
        f"loss cliff (Pascanu et al. 2013, Fig. 6): wall {summary['wall_ratio']:.0f}x the median "
        f"gradient; clipping ends lower at {summary['starts_where_clipping_wins']} of "
        f"{len(summary['final_loss_clipped'])} starts -> {summary['png']}"
    )
