"""G-SimCLR stage 1 (Chakraborty et al., 2020): the denoising convolutional autoencoder whose latents become pseudo
labels for configs/gsimclr.py.

Arguments (comma separated after the file name):
  epochs=50        training epochs over the images
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Then cluster its latents: `python -m jaxssl.pseudo_labels --workdir=<this run> --clusters=K` writes
<run>/pseudo_labels.npy (K = the reference's 64, its SimCLR batch size; configs/gsimclr.py needs K >= its
input.global_batch).
Examples:
  --config=configs/gsimclr_dae.py --config.input.data_root=/data/imagenet_subset   (<root>/train/<class>/<image>)
  --config=configs/gsimclr_dae.py:runlocal
Reference recipe: ariG23498/G-SimCLR CIFAR10/Autoencoder.ipynb (Conv 3x3 32/64/128 + BN + ReLU + MaxPool, mirrored
decoder, sigmoid, GaussianNoise 0.01, MSE, Adam), shared/reference/methods/simclr_vicreg_dino_poa_uni.md (1b).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, epochs=50, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'gsimclr_dae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.widths = (32, 64, 128)  # the CIFAR-10 autoencoder's; the latent is 128-d
    c.model.kernel = 3
    c.model.noise_std = 0.01  # Keras GaussianNoise on [0, 1] pixels, training only

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.image_size = 32  # CIFAR's size, the reference autoencoder's input; a multiple of 2^len(widths)
    c.input.eval_crop_pct = 1.0  # the whole image, resized: the autoencoder sees unaugmented images
    c.input.global_batch = 64 if arg.runlocal else 256

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # with weight_decay 0: Keras' Adam
    c.optim.base_lr = 1e-3 * 256 / c.input.global_batch  # lr = base_lr x batch / 256 = Keras' default 1e-3
    c.optim.min_lr = c.optim.base_lr  # a constant rate, as Keras' Adam
    c.optim.warmup_epochs = 0
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-7  # Keras' epsilon
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Probes of the latent (the feature k-means clusters) on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
