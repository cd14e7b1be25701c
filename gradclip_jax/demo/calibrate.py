"""Calibration of the demo's default: the results table at several sequence lengths.

``python -m gradclip_jax.demo.calibrate`` runs the default configuration (any flag of
``gradclip-demo`` changes it) once per length and writes ``calibration.md`` and
``calibration.json``: for every length and strategy, how many seeds were solved and how many
diverged, and the range of the held-out losses. docs/demo.md publishes its output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

from gradclip_jax.demo.experiment import run_demo
from gradclip_jax.demo.train import DemoConfig


def calibrate(
    config: DemoConfig, lengths: Sequence[int], out_dir: str | pathlib.Path
) -> dict[int, list[dict[str, Any]]]:
    """Runs `run_demo` with ``config`` at every length (outputs in ``out_dir/length_<n>``).

    Returns:
      Length -> the rows of its results table.
    """
    out_dir = pathlib.Path(out_dir)
    results = {}
    for length in lengths:
        run_config = dataclasses.replace(config, length=length)
        results[length] = run_demo(run_config, out_dir / f"length_{length}", progress=False)
    table = calibration_table(config, results)
    (out_dir / "calibration.md").write_text(table + "\n")
    (out_dir / "calibration.json").write_text(
        json.dumps({"config": dataclasses.asdict(config), "rows": results}, indent=2)
    )
    print(table)
    return results


def calibration_table(config: DemoConfig, results: dict[int, list[dict[str, Any]]]) -> str:
    """Markdown: one row per strategy, one column per length, ``solved / diverged`` of the
    seeds, and the range of the held-out losses of the seeds that did not diverge."""
    lengths = list(results)
    names = [row["strategy"] for row in results[lengths[0]]]
    seeds = len(config.seeds)
    lines = [
        f"task {config.task}, {seeds} seeds {list(config.seeds)}: solved / diverged, and the "
        "held-out loss range of the seeds that did not diverge",
        "",
        "| strategy | " + " | ".join(f"length {n}" for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for i, name in enumerate(names):
        cells = []
        for length in lengths:
            row = results[length][i]
            finite = [x for x in row["per_seed"]["held_out_loss"] if x != float("inf")]
            spread = f"{min(finite):.3g} to {max(finite):.3g}" if finite else "-"
            solved, diverged = row["solved"], row["diverged"]
            cells.append(f"{solved}/{seeds} solved, {diverged}/{seeds} div ({spread})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m gradclip_jax.demo.calibrate [--lengths N ...] [gradclip-demo flags]``."""
    from gradclip_jax.demo.cli import config_from_args, parse_args

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--lengths", type=int, nargs="+", default=[50, 80, 120])
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    calibrate(config_from_args(args), known.lengths, args.out)


if __name__ == "__main__":
    main()
