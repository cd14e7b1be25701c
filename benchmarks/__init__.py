"""Side-by-side benchmarks of gradclip_jax against optax (and PyTorch when installed).

Run ``python -m benchmarks --help``; see ``benchmarks/README.md``.
"""
