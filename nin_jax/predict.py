"""`python -m nin_jax.predict`: the command line of `nin_jax.tools.predict`."""

import sys

from nin_jax.tools.predict import main

if __name__ == "__main__":
    sys.exit(main())
