"""VICReg pretraining (Bardes, Ponce, LeCun, ICLR 2022): two views, expander 8192-8192-8192, variance-invariance-
covariance loss over the global batch, LARS.

Arguments (comma separated after the file name):
  variant=B        ViT encoder size: micro, tiny, S-like sizes from jaxssl.models.mae's table (B, L, H; '/patch'),
                   or the paper's ResNet: resnet50 (also resnet18 / resnet34 / resnet101)
  epochs=1000      the paper's headline schedule (its ablations use 100); 10 of them warm up
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/vicreg.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/vicreg.py:runlocal
Reference recipe: facebookresearch/vicreg (main_vicreg.py, README),
shared/reference/methods/simclr_vicreg_dino_poa_uni.md.
The reference backbone is a ResNet-50; this config uses the shared ViT (docs/methods.md lists the differences).
"""

import ml_collections

from jaxssl.config import add_backbone_config, add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=1000, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'vicreg'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    add_backbone_config(c, arg.variant, arg.runlocal)  # a ViT, or a ResNet (the paper's backbone)
    c.model.head_layers = 3  # the expander: 2 x (Linear + BN + ReLU) + Linear, the reference's '8192-8192-8192'
    c.model.head_hidden = 256 if arg.runlocal else 8192
    c.model.head_out = 256 if arg.runlocal else 8192
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters, expander, loss float32
    c.model.scan_layers = False  # LARS's trust ratio is per layer: a scanned stack would share one
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '' lets XLA choose; 'cudnn' forces cuDNN flash attention on GPUs

    c.loss = ml_collections.ConfigDict()
    c.loss.sim_coeff = 25.0  # lambda, invariance
    c.loss.std_coeff = 25.0  # mu, variance
    c.loss.cov_coeff = 1.0  # nu, covariance
    c.loss.std_eps = 1e-4  # added to the variance before the square root

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 2  # two views per image
    c.input.crop_scale = (0.08, 1.0)  # torchvision RandomResizedCrop's default scale, as the reference
    c.input.interpolation = 'bicubic'
    # The reference's jitter is (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) at p 0.8; SimCLR's views at
    # strength 0.5 give (0.4, 0.4, 0.4, 0.1): saturation differs (a no-op on the grey digits).
    c.input.jitter_strength = 0.5
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2
    # The reference blurs view 1 always and view 2 with p 0.1 (and solarizes view 2 with p 0.2); the shared view
    # function is the same for both views, so the average, 0.55, is used; no solarization (docs/methods.md).
    c.input.blur_prob = 0.0 if arg.runlocal else 0.55
    c.input.global_batch = 64 if arg.runlocal else 2048

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'lars'
    c.optim.base_lr = 0.2  # lr = base_lr * global_batch / 256: 1.6 at 2048 (the README's 1000-epoch command)
    c.optim.min_lr = 0.0  # set below: the reference's cosine ends at 0.001 x the peak lr
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3  # LARS eta
    c.optim.weight_decay = 1e-6
    c.optim.clip_grad = 0.0
    # AdamW's moments, used when optim.name='adamw'.
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    # 1-D parameters (biases, norms, BN) get neither decay nor LARS adaptation, as the reference's exclusions.
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) of the backbone's cls token and mean patch token on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 64 digits (128 views).
        c.optim.base_lr = 1.2
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    # min_lr is scaled by global_batch / 256 as base_lr is, so this ends the cosine at 0.001 x the peak.
    c.optim.min_lr = 0.001 * c.optim.base_lr
    return c
