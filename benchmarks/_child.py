"""One comparison in its own process: ``python -m benchmarks._child NAME CONFIG OUT``."""

from __future__ import annotations

import importlib
import json
import sys
import time

from benchmarks._config import Config
from benchmarks._jsonsafe import finite

# comparison name -> module with `run(cfg)` or `module:function`.
COMPARISONS = {
    "leaf_sweep": "sweeps:leaf_sweep",
    "size_sweep": "sweeps:size_sweep",
    "chain_adam": "chain_adam:run",
    "throughput": "throughput:run",
    "torch": "torch_clip:run",
}


def main(argv: list[str] | None = None) -> int:
    name, config_path, out_path = argv if argv is not None else sys.argv[1:]
    with open(config_path) as f:
        cfg = Config.from_json(json.load(f))
    import jax

    # A persistent compilation cache would turn compile measurements into cache reads.
    jax.config.update("jax_enable_compilation_cache", False)
    from benchmarks._measure import environment

    module_name, function_name = COMPARISONS[name].split(":")
    run = getattr(importlib.import_module(f"benchmarks.{module_name}"), function_name)
    start = time.perf_counter()
    result = run(cfg)
    result["wall_s"] = time.perf_counter() - start
    result["env"] = environment()
    with open(out_path, "w") as f:
        json.dump(finite(result), f, indent=1, allow_nan=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
