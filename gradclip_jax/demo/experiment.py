"""One demo run end to end: train every strategy, evaluate, print the table, write the files."""

from __future__ import annotations

import pathlib
import time
from typing import Any

from tqdm.auto import tqdm

from gradclip_jax.demo import plots, report
from gradclip_jax.demo.train import DemoConfig, evaluate, train


def run_demo(
    config: DemoConfig, out_dir: str | pathlib.Path = "demo_output", progress: bool = True
) -> list[dict[str, Any]]:
    """Trains every strategy of ``config`` on the same seeds and data, and reports.

    Prints the results table and writes ``results.json``, ``results.md``, ``history.npz``,
    ``loss.png``, ``grad_norm.png`` and ``hidden_grad.png`` into ``out_dir`` (created if needed).

    Args:
      config: the demo configuration.
      out_dir: output folder.
      progress: show a progress bar.

    Returns:
      The rows of the results table (`gradclip_jax.demo.report.summarize`).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tqdm(total=config.steps, disable=not progress, unit="step") as bar:
        bar.set_description("compiling")
        run = train(config, on_chunk=lambda steps: _advance(bar, steps))
    bar.set_description("evaluating")
    initial, *finals = evaluate(
        config, run.model_graphdef, [run.initial_models, *run.final_models.values()]
    )
    final = dict(zip(run.names, finals))
    rows = [report.summarize(config, run, name, final[name]) for name in run.names]
    health = {"init": report.seed_median_health(initial["health"])}
    health |= {name: report.seed_median_health(final[name]["health"]) for name in run.names}
    total_seconds = time.perf_counter() - start
    print(report.results_table(rows))
    print(report.timing_line(config, run, total_seconds))
    report.write_results(out_dir, config, rows, health, run, total_seconds)
    report.write_history(out_dir, run)
    plots.plot_losses(config, run, out_dir / "loss.png")
    plots.plot_grad_norms(config, run, out_dir / "grad_norm.png")
    plots.plot_hidden_gradients(
        config,
        initial["hidden_grad_norms"],
        {name: final[name]["hidden_grad_norms"] for name in run.names},
        {name: run.diverged_at[name] >= 0 for name in run.names},
        out_dir / "hidden_grad.png",
    )
    print(f"Wrote results.json, results.md, history.npz and three plots to {out_dir}/")
    return rows


def _advance(bar: Any, steps: int) -> None:
    bar.set_description("training")
    bar.update(steps)
