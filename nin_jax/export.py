"""`python -m nin_jax.export`: the command line of `nin_jax.tools.export`."""

import sys

from nin_jax.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
