"""NIN-ImageNet, the Caffe model-zoo network and solver (59.36% top-1 on the ILSVRC-2012 validation set).

    python -m nin_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/nin_imagenet \\
        --config.run.data_dir=/mnt/gcs/tensorflow_datasets
    python -m nin_jax.main --config=configs/imagenet.py:pod --workdir=gs://BUCKET/nin_imagenet_pod \\
        --config.run.data_dir=/mnt/gcs/tensorflow_datasets

Data: TFDS `imagenet2012` built as ArrayRecord, read by random access from a local, shared or FUSE-mounted
path (here gs://BUCKET mounted at /mnt/gcs), not from gs:// itself; see docs/clusters.md. Training: random
resized crops to 224 + flips; evaluation: resize to 256 and center-crop 224 (single crop; the model zoo's
59.36% is single-crop, 10 crops "should be a bit higher"). Input: per-channel mean/std.

Default (model zoo): batch 64, SGD momentum 0.9, LR 0.01, weight decay 5e-4, bias LR x2, LR /10 every 200k
iterations, 450k iterations (22.5 epochs of the 1,281,167 training images). Expected: ~59% top-1.
`:pod`: the same 22.5 epochs at batch 1024 (28,147 steps), the LR scaled linearly with the batch (0.01 x
1024/64 = 0.16), reached by a linear warmup over 2 epochs and then decayed by a cosine to 0 (the step
schedule of `recipe='caffe'` has no warmup). The batch splits over up to 1024 devices (v4-32: 64 per chip).

Runtime (analytic estimate, not measured): one training image is 6.40 GFLOP (3x the 2.20 GFLOP forward pass,
less the first layer's input gradient), so 22.5 epochs are 28.8M images = 184 PFLOP for either variant.
Assuming 15% MFU (NIN's large-stride 11x11 first layer and 1x1 layers keep the MXU far from full), that is
~19 minutes on a v4-8 (4 chips x 275 TFLOP/s bf16) and ~5 minutes on a v4-32, if the input pipeline keeps
up: 26k and 103k decoded images/s. The tf.data JPEG recipe measured ~315 img/s per CPU core, so expect the
run to be input-bound at about (host cores x 315) img/s. The model zoo took 4-5 days on one GTX Titan.
"""

from nin_jax import config as default

TRAIN_IMAGES = 1_281_167


def get_config(variant: str = ""):
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
                             lr_boundaries_epochs=tuple(k * 200_000 * 64 / TRAIN_IMAGES for k in (1, 2)))
    config.run.eval_batch_size = 512
    config.half_precision = True
    if variant == "":
        config.num_train_steps = 450_000
        config.batch_size = 64
        config.run.log_every_steps = 500
        config.run.eval_every_steps = 20_000
        config.run.checkpoint_every_steps = 5_000
    elif variant == "pod":
        config.batch_size = 1024
        config.optim.learning_rate = 0.01 * config.batch_size / 64
        config.recipe = "modern"  # linear warmup, then cosine
        config.optim.lr_boundaries_epochs = ()
        config.optim.warmup_epochs = 2.0
        config.num_epochs = 22.5
        config.num_train_steps = -1
        config.run.eval_batch_size = 1024
        config.run.log_every_steps = 100
        config.run.eval_every_steps = 2_500
        config.run.checkpoint_every_steps = 1_000
    else:
        raise default.ConfigError(f"configs/imagenet.py:{variant} is unknown; use no variant (the model zoo's "
                                  "batch 64) or :pod.")
    return config
