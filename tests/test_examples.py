"""Smoke tests: the scripts in examples/ run and print what their docstrings promise."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_custom_rule_example_clips_the_spikes_and_trains_better(capsys):
    runpy.run_path(str(EXAMPLES / "custom_rule.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["clipping", "final", "loss", "steps", "clipped"]
    rows = {line[:24].strip(): line[24:].split() for line in lines[1:]}
    assert set(rows) == {"no clipping", "GrowthLimit, global", "GrowthLimit, per leaf"}
    plain_loss = float(rows["no clipping"][0])
    for name in ("GrowthLimit, global", "GrowthLimit, per leaf"):
        loss, clipped = float(rows[name][0]), int(rows[name][1])
        assert clipped >= 3  # the three x1000 spikes, at least
        assert loss < 0.5 * plain_loss
