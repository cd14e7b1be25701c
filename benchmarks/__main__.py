"""``python -m benchmarks``: runs every comparison and writes the results."""

from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
