"""`python -m nin_jax.input_benchmark`: the command line of `nin_jax.tools.input_benchmark`."""

from nin_jax.tools.input_benchmark import main

if __name__ == "__main__":
    main()
