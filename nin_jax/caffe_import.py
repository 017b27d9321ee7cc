"""`python -m nin_jax.caffe_import`: the command line of `nin_jax.tools.caffe_import`."""

import sys

from nin_jax.tools.caffe_import import main

if __name__ == "__main__":
    sys.exit(main())
