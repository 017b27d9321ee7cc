"""`python -m nin_jax.analysis`: the command line of `nin_jax.tools.analysis`."""

import sys

from nin_jax.tools.analysis import main

if __name__ == "__main__":
    sys.exit(main())
