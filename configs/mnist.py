"""NIN-MNIST (the paper's 0.47% test error).

    python -m nin_jax.main --config=configs/mnist.py --workdir=gs://BUCKET/nin_mnist

The `mnist_def` network (96/64/48, 128/96/48, 128/96/10 maps, 28 -> 14 -> 7), pixels scaled to [0, 1] as in
maxout's MNIST, no augmentation (as in the paper). The cuda-convnet solver is not published: SGD momentum
0.9, LR 0.1, weight decay 1e-4, bias LR x2, the class-map layer at x0.1, 100 epochs with LR /10 at 60 and
85. Expected: about 99.5% top-1 on the test split.

Expected runtime: 100 epochs x 60k x 0.30 GFLOP = 1.8 PFLOP, under a minute of compute on one TPU v4 chip
(analytic estimate at 15% MFU, not measured; such a short run is bound by its input and compilation). On a CPU,
`python -m nin_jax.benchmark --config=configs/mnist.py` measures the step rate to estimate from.
"""

from nin_jax import config as default


def get_config():
    config = default.get_config()
    config.dataset = "mnist"
    config.train_split = "train"
    config.eval_split = "test"
    config.preprocess = "scale"
    config.augment.translate = 0
    config.augment.flip = False
    config.model.arch = "nin_mnist"
    default.use_caffe_solver(config, learning_rate=0.1, weight_decay=1e-4, output_lr_mult=0.1,
                             lr_boundaries_epochs=(60.0, 85.0))
    config.num_epochs = 100.0
    config.batch_size = 128
    return config
