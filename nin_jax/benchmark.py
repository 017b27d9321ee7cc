"""`python -m nin_jax.benchmark`: the command line of `nin_jax.tools.benchmark`."""

from absl import app

from nin_jax.tools.benchmark import main

if __name__ == "__main__":
    app.run(main)
