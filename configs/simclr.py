"""SimCLR pretraining (Chen et al., ICML 2020): two views, projection head, NT-Xent over the global batch, LARS.

Arguments (comma separated after the file name):
  variant=B        ViT encoder size: micro, tiny, S-like sizes from jaxssl.models.mae's table (B, L, H; '/patch'),
                   or the paper's ResNet: resnet50 (also resnet18 / resnet34 / resnet101)
  epochs=100       100 (the paper's ablations) or 1000 (its headline); 10 of them warm up
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/simclr.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/simclr.py:runlocal
Reference recipe: google-research/simclr (tf2/, README), shared/reference/methods/simclr_vicreg_dino_poa_uni.md.
The reference backbone is a ResNet-50; this config uses the shared ViT (docs/methods.md lists the differences).
"""

import ml_collections

from jaxssl.config import add_backbone_config, add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=100, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'simclr'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    add_backbone_config(c, arg.variant, arg.runlocal)  # a ViT, or a ResNet (the paper's backbone)
    c.model.head_layers = 2  # the paper's (v1) head; SimCLR v2 uses 3
    c.model.head_hidden = 128 if arg.runlocal else 2048
    c.model.head_out = 64 if arg.runlocal else 128
    # 'mlp' (the paper's head), 'reweight' (Xue et al. 2024's fixed head z_i = h_i / kappa^i) or 'none' (loss on h)
    c.model.head_type = 'mlp'
    c.model.head_kappa = 1.05  # the reweighting head's kappa (the paper's values are not verified here)
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False  # LARS's trust ratio is per layer: a scanned stack would share one
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '' lets XLA choose; 'cudnn' forces cuDNN flash attention on GPUs

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1  # the flag default and README ImageNet command (the CIFAR command: 0.5)

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 2  # two views per image
    c.input.crop_scale = (0.08, 1.0)  # SimCLR's RandomResizedCrop area
    c.input.interpolation = 'bicubic'
    c.input.jitter_strength = 0.5 if arg.runlocal else 1.0  # the reference's CIFAR strength 0.5, ImageNet 1.0
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2  # no effect on the grey digits (nor saturation / hue in the jitter)
    c.input.blur_prob = 0.0 if arg.runlocal else 0.5  # the reference blurs ImageNet views, not CIFAR's small ones
    c.input.global_batch = 64 if arg.runlocal else 4096

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'lars'
    c.optim.base_lr = 0.3  # lr = base_lr * global_batch / 256: 4.8 at 4096 (= 0.075 * sqrt(4096))
    c.optim.min_lr = 0.0  # cosine to 0
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3  # LARS eta
    c.optim.weight_decay = 1e-6  # the paper's (v1); v2 and the README command use 1e-4
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
    return c
