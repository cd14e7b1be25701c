"""``python -m gradclip_jax.demo``: same as ``gradclip-demo``."""

from gradclip_jax.demo.cli import main

if __name__ == "__main__":
    main()
