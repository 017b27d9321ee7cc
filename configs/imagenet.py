"""NIN-ImageNet, the Caffe model-zoo network and solver (59.36% top-1 on the ILSVRC-2012 validation set).

    python -m nin_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/nin_imagenet \
        --config.data_dir=gs://BUCKET/tensorflow_datasets

Data: TFDS `imagenet2012` built as ArrayRecord (see the README for the manual download). Training: random
resized crops to 224 + flips; evaluation: resize to 256 and center-crop 224 (single crop; the model zoo's
59.36% is single-crop, 10 crops "should be a bit higher"). Input: per-channel mean/std.
Solver (model zoo): batch 64, SGD momentum 0.9, LR 0.01, weight decay 5e-4, bias LR x2, LR /10 every 200k
iterations, 450k iterations (~22.5 epochs). On a pod, raise `--config.batch_size` with the LR scaled
linearly (e.g. 1024 and 0.16).
Expected: ~59% top-1. Runtime: 450k x 64 x 6.4 GFLOP = 184 PFLOP, about 4 hours on a TPU v4-8 (4 chips) at
15% MFU (analytic estimate, not measured); the model zoo took 4-5 days on one GTX Titan.
"""

from nin_jax import config as default


def get_config():
    config = default.get_config()
    config.dataset = "imagenet2012"
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 224
    config.preprocess = "standardize"
    config.augment.translate = 0
    config.augment.flip = True
    config.augment.random_resized_crop = True
    config.augment.eval_resize = 256
    config.model.arch = "nin_imagenet"
    # LR /10 every 200k iterations of batch 64.
    default.use_caffe_solver(config, learning_rate=0.01, weight_decay=5e-4, output_lr_mult=1.0,
                             lr_boundaries_epochs=tuple(k * 200_000 * 64 / 1_281_167 for k in (1, 2)))
    config.num_train_steps = 450_000
    config.batch_size = 64
    config.eval_batch_size = 512
    config.half_precision = True
    config.log_every_steps = 500
    config.eval_every_steps = 20_000
    config.checkpoint_every_steps = 5_000
    return config
