"""NIN-CIFAR100 (the paper's 35.68% test error).

    python -m nin_jax.main --config=configs/cifar100.py --workdir=gs://BUCKET/nin_cifar100

The paper uses the CIFAR-10 hyper-parameters unchanged, and the author's cuda-convnet `cifar-100_def`
(smaller Gaussian init for the first block: 0.001 / 0.01 / 0.01) and `cifar-100_params`: epsW 0.01 with
logprob coeff 2 and wc 0.001 per example-summed gradient, i.e. LR 0.02 and weight decay 5e-4 in Caffe's
mean-loss convention. The cuda-convnet pooling (pool2 max) is kept. Schedule as for CIFAR-10
(~307 epochs, LR /10 at ~256). Expected: about 64% top-1 on the test split (35.68% error).
`:modern` (BN, cosine, augmentation): expected about 70%.

Expected runtime: 120k steps x 128 x 1.312 GFLOP = 20 PFLOP, about 8 minutes on one TPU v4 chip (275 TFLOP/s) at
15% MFU (analytic estimate, not measured).
"""

import pathlib

from nin_jax.config import load_config_file


def get_config(recipe: str = "caffe"):
    config = load_config_file(str(pathlib.Path(__file__).with_name("cifar10.py")), recipe)
    config.dataset = "cifar100"
    config.model.arch = "nin_cifar100"
    if recipe == "caffe":
        config.model.pool2 = "preset"
        config.optim.learning_rate = 0.02
        config.optim.weight_decay = 5e-4
    return config
