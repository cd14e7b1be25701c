"""Sizes, repeats and goal reference points of a full run and of the ``--quick`` smoke run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

M = 1_000_000


@dataclass(frozen=True)
class Config:
    """Everything a comparison needs to know; sent to each child process as JSON."""

    quick: bool = False
    # Compile time and run time vs number of leaves (leaves of `leaf_size` float32).
    leaf_counts: tuple[int, ...] = (100, 500, 1000, 2000)
    leaf_size: int = 1000
    compile_repeats: int = 3
    # Further compile repeats only for compiles faster than this; slow ones are measured once.
    compile_repeat_below_s: float = 5.0
    # Skip a (non-headline) clipper at a leaf count whose predicted compile exceeds this.
    compile_cap_s: float = 60.0
    # Run time vs total size: `size_leaves` equal leaves.
    size_totals: tuple[int, ...] = (1 * M, 5 * M, 20 * M, 50 * M)
    size_leaves: int = 10
    run_repeats: int = 11
    # Fewer rounds for trees of at least `large_total` elements.
    large_total: int = 20 * M
    large_repeats: int = 7
    min_sample_s: float = 0.02
    chain_total: int = 20 * M
    torch_totals: tuple[int, ...] = (1 * M, 20 * M, 50 * M)
    torch_leaf_counts: tuple[int, ...] = (100, 500)
    # Keys of the optax-twinned clippers to measure (all when empty), and at most how many
    # adaptive clippers (all when None): the smoke run measures a few, the full run all.
    clipper_subset: tuple[str, ...] = ()
    max_adaptive: int | None = None
    # Where the goals are judged.
    compile_goal_leaves: int = 1000
    run_goal_leaves: int = 2000
    run_goal_total: int = 20 * M

    def repeats_for(self, total: int) -> int:
        return self.large_repeats if total >= self.large_total else self.run_repeats

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Config:
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        )


QUICK = Config(
    quick=True,
    leaf_counts=(4,),
    compile_repeats=1,
    compile_cap_s=30.0,
    size_totals=(20_000,),
    run_repeats=2,
    large_total=20_000,
    large_repeats=1,
    min_sample_s=0.0005,
    chain_total=20_000,
    torch_totals=(20_000,),
    torch_leaf_counts=(4,),
    clipper_subset=(
        "ours:clip_by_global_norm",
        "optax:clip_by_global_norm",
        "ours:agc",
        "optax:adaptive_grad_clip",
    ),
    max_adaptive=1,
    compile_goal_leaves=4,
    run_goal_leaves=4,
    run_goal_total=20_000,
)

FULL = Config()
