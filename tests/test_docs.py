"""The documentation site: it builds with warnings as errors, every code block on it
runs, and the API reference covers every public name."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import gradclip_jax
from gradclip_jax import rules

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNER = pathlib.Path(__file__).resolve().parent / "_docs_runner.py"
sys.path.insert(0, str(RUNNER.parent))
from _docs_runner import python_blocks  # noqa: E402

# Building the site and running every page takes a minute: the full run, not the fast tier.
pytestmark = pytest.mark.slow

PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The HTML site, built as CI builds it: nitpicky, every warning an error."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(out),
            "-d",
            str(out / ".doctrees"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_strictly(built_site):
    for page in [*DOCS.glob("*.md"), *DOCS.glob("*.rst")]:
        assert (built_site / page.with_suffix(".html").name).is_file(), page.name


def test_every_public_name_is_in_the_api_reference(built_site):
    html = (built_site / "api.html").read_text()
    anchors = set(re.findall(r'id="((?:module-)?gradclip_jax\.[\w.]+)"', html))
    expected = {f"gradclip_jax.{name}" for name in gradclip_jax.__all__ if name != "rules"}
    expected |= {f"gradclip_jax.rules.{name}" for name in rules.__all__}
    expected.add("module-gradclip_jax.rules")
    missing = sorted(expected - anchors)
    assert not missing, f"not documented in docs/api.rst: {missing}"


def test_images_referenced_by_the_pages_exist():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).is_file(), f"{page.name}: {target}"


@pytest.mark.parametrize(
    "page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_code_blocks_run(page, tmp_path):
    """Every ``python`` block of the page runs, in order, as a reader would paste them.

    Eight simulated CPU devices, so the multi-device examples run as written.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    result = subprocess.run(
        [sys.executable, str(RUNNER), str(page)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
        timeout=600,
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert re.search(r"ran [1-9]\d* python blocks", result.stdout)
