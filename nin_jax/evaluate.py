"""`python -m nin_jax.evaluate`: the command line of `nin_jax.tools.evaluate`."""

import sys

from nin_jax.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
