"""Tests for gradclip_jax.demo: models, tasks, the training engine and the CLI, on tiny sizes."""

import json

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

pytest.importorskip("flax")
from flax import nnx  # noqa: E402

from gradclip_jax.demo import report  # noqa: E402
from gradclip_jax.demo.cli import main  # noqa: E402
from gradclip_jax.demo.models import DeepRNN  # noqa: E402
from gradclip_jax.demo.tasks import TASKS, get_task  # noqa: E402
from gradclip_jax.demo.train import (  # noqa: E402
    DemoConfig,
    TrainingRun,
    available_strategies,
    train_step,
)

EVERY_STRATEGY = (
    "none",
    "value",
    "global_norm",
    "leaf_norm",
    "agc",
    "autoclip",
    "zclip",
    "adaptive_clip",
    "adagc",
    "quantile",
)
STEPS = 6


def test_every_strategy_of_the_issue_is_available():
    assert tuple(available_strategies()) == EVERY_STRATEGY


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    """One end-to-end CLI run with every strategy in one compiled program (the expensive part of
    this file): a 2-layer IRNN whose recurrence triples the state (scale 3) over 8 steps, trained
    at learning rate 1, so that unclipped SGD diverges at once; seeds 3 and 5."""
    out = tmp_path_factory.mktemp("demo")
    argv = ["--activation", "relu", "--recurrent-init", "identity", "--recurrent-scale", "3"]
    argv += ["--learning-rate", "1", "--schedule", "constant", "--length", "8", "--depth", "2"]
    argv += ["--hidden", "4", "--batch-size", "4", "--steps", str(STEPS), "--seeds", "3", "5"]
    main([*argv, "--out", str(out), "--no-progress", "--fast-compile"])
    results = json.loads((out / "results.json").read_text())
    return out, results, dict(np.load(out / "history.npz"))


@pytest.mark.slow
def test_cli_writes_table_json_markdown_and_plots(demo_output):
    out, results, _ = demo_output
    assert [row["strategy"] for row in results["strategies"]] == list(EVERY_STRATEGY)
    for row in results["strategies"]:
        assert row["per_seed"]["seed"] == [3, 5]
        assert len(row["per_seed"]["held_out_loss"]) == len(row["per_seed"]["reason"]) == 2
        assert 0.0 <= row["clip_rate"] <= 1.0
    rows = {row["strategy"]: row for row in results["strategies"]}
    assert rows["none"]["clip_rate"] == 0.0 and rows["value"]["clip_rate"] > 0.0
    # A global clipper clips all or nothing: its rate of clipped steps is its mean fraction.
    assert rows["global_norm"]["clip_rate"] == pytest.approx(
        rows["global_norm"]["clipped_fraction_mean"]
    )
    assert results["config"]["depth"] == 2 and results["config"]["learning_rate"] == 1.0
    assert set(results["gradient_health"]) == {"init", *EVERY_STRATEGY}
    markdown = (out / "results.md").read_text()
    assert "| strategy" in markdown and "| global_norm" in markdown
    assert "* **none** (2/2): seed 3: diverged at step" in markdown
    for name in ("loss.png", "grad_norm.png", "hidden_grad.png", "cliff.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600, name
        assert image.std() > 0.05, f"{name} looks blank"


@pytest.mark.slow
def test_every_strategy_trains_and_records_its_statistics(demo_output):
    _, _, history = demo_output
    for name in EVERY_STRATEGY:
        losses = history[f"{name}/loss"]
        assert losses.shape == history[f"{name}/grad_norm"].shape == (2, STEPS)
        for seed, step in enumerate(history[f"{name}/diverged_at"]):
            end = STEPS if step < 0 else step
            assert np.all(np.isfinite(losses[seed, :end])), name
            assert np.all(np.isnan(losses[seed, end + 1 :])), name
        clipped = [key for key in history if key.startswith(f"{name}/") and "/clipped" in key]
        assert len(clipped) == (0 if name == "none" else 2), name  # clipped, clipped_norm
    # Same seeds, same data: the first loss (before any update) is the same for all strategies.
    first = np.stack([history[f"{name}/loss"][:, 0] for name in EVERY_STRATEGY])
    np.testing.assert_allclose(first, np.broadcast_to(first[:1], first.shape), rtol=1e-6)
    prefix = "global_norm/clip_by_global_norm"
    np.testing.assert_allclose(
        history[f"{prefix}/norm"], history["global_norm/grad_norm"], rtol=1e-5
    )
    assert np.all(history[f"{prefix}/clipped_norm"] <= 1.0 + 1e-5)


@pytest.mark.slow
def test_divergence_is_detected_masked_and_reported(demo_output):
    _, results, history = demo_output
    rows = {row["strategy"]: row for row in results["strategies"]}
    assert np.all(history["none/diverged_at"] >= 0)
    assert rows["none"]["diverged"] == 2 and rows["none"]["solved"] == 0
    assert rows["none"]["final_loss_median"] == float("inf")
    assert rows["none"]["per_seed"]["diverged_at_step"] == list(history["none/diverged_at"])
    assert np.all(history["global_norm/diverged_at"] < 0) and rows["global_norm"]["diverged"] == 0
    # adaptive_clip's cold start clips the first explosive steps (threshold 1, then 4 x the
    # smallest clipped norm), so it survives where no clipping diverges at step 1.
    assert np.all(history["adaptive_clip/diverged_at"] < 0)
    assert rows["adaptive_clip"]["diverged"] == 0
    # Diverged seeds are frozen at their last finite parameters.
    for name in EVERY_STRATEGY:
        norms = [leaf["param_norm"] for leaf in results["gradient_health"][name]]
        assert np.all(np.isfinite(norms)), name


def test_python_m_entry_point_is_the_cli():
    import gradclip_jax.demo.__main__ as entry  # the __name__ guard keeps it from running

    assert entry.main is main


@pytest.mark.slow  # trains each model end to end
@pytest.mark.parametrize(
    "cell, activation, recurrent_init, task, length",
    [
        ("rnn", "tanh", "normal", "temporal_order", 1),
        ("lstm", "tanh", "orthogonal", "adding", 2),
    ],
)
def test_every_model_and_task_trains(cell, activation, recurrent_init, task, length):
    """With the CLI run (ReLU RNN, adding), every cell, activation and task trains, through
    `train_step`, down to length 1."""
    task = get_task(task)
    model = DeepRNN(
        task.input_size,
        4,
        task.output_size,
        depth=2,
        cell=cell,
        activation=activation,
        recurrent_init=recurrent_init,
        rngs=nnx.Rngs(0),
    )
    optimizer = nnx.Optimizer(model, DemoConfig().transformation("global_norm"), wrt=nnx.Param)
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for step in range(2):
        inputs, targets = task.sample(jax.random.key(step), 4, length)
        loss, grad_norm = train_step(model, optimizer, task, inputs, targets)
        assert np.isfinite(float(loss)) and float(grad_norm) > 0
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after)
    # With length 1 the recurrent kernels multiply the zero initial state and get no gradient.
    assert changed["readout"]["kernel"] and changed["layers"][0]["input_kernel"]
    assert all(jax.tree.leaves(changed)) or length == 1


@pytest.mark.slow
def test_samplers_take_any_length():
    for length in (1, 2):  # the baseline tests below use 20 and 50
        for task in TASKS.values():
            inputs, targets = task.sample(jax.random.key(length), 3, length)
            assert inputs.shape == (length, 3, task.input_size)
            assert targets.shape[0] == 3
        markers = TASKS["adding"].sample(jax.random.key(0), 3, length)[0][:, :, 1]
        np.testing.assert_array_equal(markers.sum(axis=0), min(length, 2))


@pytest.mark.slow
def test_adding_problem_baseline():
    task = get_task("adding")
    inputs, targets = task.sample(jax.random.key(0), 50_000, 20)
    assert np.all(inputs[:, :, 1].sum(axis=0) == 2)
    constant = float(task.loss(jnp.ones_like(targets), targets))
    np.testing.assert_allclose(constant, task.baseline_loss, rtol=0.02)
    np.testing.assert_allclose(task.baseline_loss, 1 / 6)
    # Knowing the first marked value exactly leaves the second one's variance, 1/12.
    first = inputs[inputs[:, :, 1].argmax(axis=0), jnp.arange(50_000), 0][:, None]
    np.testing.assert_allclose(float(task.loss(first + 0.5, targets)), 1 / 12, rtol=0.03)


@pytest.mark.slow
def test_temporal_order_baseline_and_labels():
    task = get_task("temporal_order")
    inputs, labels = task.sample(jax.random.key(0), 5_000, 50)
    np.testing.assert_allclose(np.bincount(labels, minlength=4) / 5_000, 0.25, atol=0.02)
    uniform = float(task.loss(jnp.zeros((5_000, 4)), labels))
    np.testing.assert_allclose(uniform, task.baseline_loss, rtol=1e-5)
    symbols = inputs.argmax(axis=-1)  # (length, batch)
    relevant = symbols < 2
    assert np.all(relevant.sum(axis=0) == 2)
    steps = np.argwhere(np.asarray(relevant.T))[:, 1].reshape(-1, 2)
    assert np.all(
        (steps[:, 0] >= 5) & (steps[:, 0] < 10) & (steps[:, 1] >= 25) & (steps[:, 1] < 30)
    )
    first, second = symbols[steps[:, 0], np.arange(5_000)], symbols[steps[:, 1], np.arange(5_000)]
    np.testing.assert_array_equal(labels, 2 * first + second)


def test_hidden_state_hook_is_dl_dh():
    """delta = 0 leaves the output unchanged, and a perturbation of the last step moves it."""
    model = DeepRNN(2, 4, 1, depth=2, rngs=nnx.Rngs(0))
    inputs = jax.random.uniform(jax.random.key(1), (7, 3, 2))
    zeros = jnp.zeros(model.perturbation_shape(7, 3))
    np.testing.assert_allclose(model(inputs, zeros), model(inputs))
    kick = zeros.at[1, -1].set(1.0)  # top layer, last step: feeds the read-out directly
    expected = model(inputs) + jnp.sum(model.readout.kernel[...], axis=0)[None, :]
    np.testing.assert_allclose(model(inputs, kick), expected, rtol=1e-5)


@pytest.mark.parametrize("bad", [{"depth": 0}, {"cell": "gru"}, {"activation": "gelu"}])
def test_model_arguments_are_validated(bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        DeepRNN(2, 4, 1, rngs=nnx.Rngs(0), **bad)


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ValueError, match="global_norm"):
        DemoConfig().transformation("gradient_surgery")
    with pytest.raises(ValueError, match="adding"):
        get_task("copying")


def test_moving_average_and_steps_to_solve():
    losses = np.array([[1.0, 3.0, 2.0, 0.0, np.nan]])
    np.testing.assert_allclose(report.moving_average(losses, 2), [[1.0, 2.0, 2.5, 1.0, np.nan]])


def _spiky_losses(steps=1500, spike_at=700, spike=3.5e17):
    """Training losses of 0.04 to 0.10 with one huge spike, as measured in a quantile seed."""
    losses = 0.04 + 0.06 * np.random.default_rng(0).random(steps)
    losses[spike_at] = spike
    return losses


def test_moving_average_survives_a_huge_spike():
    """A difference of running sums read 0.0 here: the spike ate the digits of later losses."""
    losses = _spiky_losses()
    averaged = report.moving_average(losses[None], 50)[0]
    np.testing.assert_allclose(averaged[-1], losses[-50:].mean(), rtol=1e-12)
    assert averaged[749] > 1e15 and averaged[750] == pytest.approx(losses[701:751].mean())


def _synthetic_run(config, history, diverged_at):
    return TrainingRun(
        names=tuple(history),
        history=history,
        diverged_at={k: np.asarray(v) for k, v in diverged_at.items()},
        model_graphdef=None,
        initial_models=None,
        final_models={},
        compile_seconds=0.0,
        train_seconds=0.0,
    )


def test_verdicts_come_from_held_out_loss_not_a_spiky_training_average():
    steps = 1500
    config = DemoConfig(steps=steps, seeds=(0, 1, 2))
    spiky = _spiky_losses(steps)
    falling = np.linspace(0.16, 0.02, steps)
    flat = np.full(steps, 0.09)
    diverged = np.concatenate([[0.17, 0.2, np.inf], np.full(steps - 3, np.nan)])
    zeros = np.zeros(steps)
    history = {
        "quantile": {
            "loss": np.stack([spiky, falling, flat]),
            "grad_norm": np.ones((3, steps)),
            "quantile_clip/threshold": np.ones((3, steps)),
            "quantile_clip/clipped": np.stack([zeros, zeros, zeros]),
            "quantile_clip/clip_count": np.zeros((3, steps)),
        },
        "none": {
            "loss": np.stack([diverged, falling, falling]),
            "grad_norm": np.full((3, steps), 3e4),
        },
    }
    run = _synthetic_run(config, history, {"quantile": [-1, -1, -1], "none": [2, -1, -1]})
    # Seed 0: the training average looks solved, but its held-out loss is 0.073.
    row = report.summarize(config, run, "quantile", {"loss": np.array([0.073, 0.03, 0.09])})
    assert row["solved"] == 1 and row["final_loss_median"] == pytest.approx(0.073)
    assert row["per_seed"]["training_loss"][0] == pytest.approx(spiky[-50:].mean())
    # Steps to solve: the first step whose 50-step average is below 0.05, solved seeds only.
    first = int(np.argmax(report.moving_average(falling[None], 50)[0] < 0.05)) + 1
    assert row["per_seed"]["steps_to_solve"] == [None, first, None]
    reasons = row["per_seed"]["reason"]
    assert reasons[1] is None
    assert reasons[0].startswith("stalled (held-out 0.073")
    assert reasons[2].startswith("stalled (held-out 0.09")
    row = report.summarize(config, run, "none", {"loss": np.array([np.nan, 0.16, 0.12])})
    assert row["solved"] == 0 and row["diverged"] == 1
    reasons = row["per_seed"]["reason"]
    # The loss became infinite at step 2: the update of step 1 threw the parameters.
    assert reasons[0] == "diverged at step 2 (loss inf; gradient norm 3e+04 at step 1, no clipping)"
    assert reasons[1].startswith("no better than the baseline (held-out 0.16")
    assert reasons[2].startswith("too slow (held-out 0.12")
    assert "| quantile" not in "\n".join(report.failure_lines([]))


def test_help_lists_the_sweep_and_shows_every_default(capsys):
    for argv in (["--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        if argv == ["--help"]:
            assert "gradclip-demo sweep" in text
        # Every option but -h is documented with its default (argparse wraps long lines).
        options = text.split("options:")[1].split("Subcommand")[0]
        entries = [e for e in options.split("\n  -") if e.strip()][1:]
        assert len(entries) >= 9, argv
        for entry in entries:
            assert "(default:" in " ".join(entry.split()), entry


@pytest.mark.slow
def test_cli_sweep_mode_writes_its_plot(tmp_path):
    argv = ["sweep", "--thresholds", "0.5", "inf", "--steps", "5", "--hidden", "4"]
    main([*argv, "--batch-size", "4", "--length", "6", "--out", str(tmp_path)])
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert len(sweep["final_loss"]) == 2
    assert matplotlib.image.imread(tmp_path / "sweep.png").std() > 0.05


def test_calibration_table_counts_solved_and_diverged_per_length():
    from gradclip_jax.demo.calibrate import calibration_table

    def row(name, held_out, diverged):
        solved = sum(x < 0.05 for x in held_out)
        per_seed = {"held_out_loss": held_out}
        return {"strategy": name, "solved": solved, "diverged": diverged, "per_seed": per_seed}

    config = DemoConfig(seeds=(0, 1))
    inf = float("inf")
    results = {
        50: [row("none", [inf, inf], 2), row("global_norm", [0.02, 0.03], 0)],
        120: [row("none", [inf, 0.17], 1), row("global_norm", [0.04, 0.06], 0)],
    }
    lines = calibration_table(config, results).splitlines()
    assert lines[2] == "| strategy | length 50 | length 120 |"
    assert lines[4] == "| none | 0/2 solved, 2/2 div (-) | 0/2 solved, 1/2 div (0.17 to 0.17) |"
    assert lines[5].endswith("| 1/2 solved, 0/2 div (0.04 to 0.06) |")


@pytest.mark.slow
def test_same_seeds_give_the_same_numbers():
    """Determinism on CPU: two runs of the same configuration record identical histories."""
    from gradclip_jax.demo.train import train

    config = DemoConfig(
        length=6,
        depth=2,
        hidden=4,
        batch_size=4,
        steps=5,
        seeds=(1, 2),
        fast_compile=True,
        strategies=("none", "zclip", "quantile"),
    )
    first, second = train(config), train(config)
    for name in config.strategies:
        assert first.history[name].keys() == second.history[name].keys()
        for key, values in first.history[name].items():
            np.testing.assert_array_equal(values, second.history[name][key], err_msg=key)
