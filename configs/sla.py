"""Self-supervised label augmentation (SLA, Lee et al., ICML 2020): joint (class x rotation) labels on the shared ViT,
aggregated inference, and SLA+SD (self-distillation into an N-way head).

Arguments (comma separated after the file name):
  variant=B        ViT encoder size from jaxssl.models.mae's table (micro, tiny, B, L, H; '/patch')
  sd               SLA+SD: add the N-way head distilled from the aggregated joint prediction
  classes=1000     number of classes N (the built-in digits: 10)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/sla.py:variant=B,sd --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/sla.py:runlocal
Reference recipe: hankook/SLA (train.py, trainers.py), shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md:
rotation transforms (M = 4), T = 1, SGD lr 0.1 momentum 0.9 wd 1e-4 on a CIFAR ResNet. The shared ViT here trains
with AdamW and a cosine schedule instead (docs/methods.md lists the differences).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def add_classifier_config(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
    """Model, input and optimiser sections shared by the labelled methods on the shared ViT (SLA, LOOK, SSLD)."""
    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.num_classes = 10 if arg.runlocal else arg.classes
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '' lets XLA choose; 'cudnn' forces cuDNN flash attention on GPUs

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.crop_scale = (0.35, 1.0) if arg.runlocal else (0.08, 1.0)
    c.input.hflip = not arg.runlocal  # a mirrored digit is another shape
    c.input.global_batch = 64 if arg.runlocal else 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.base_lr = 1e-3 * 256 / 1024  # lr 1e-3 at batch 1024 (DeiT-style supervised ViT training)
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 5
    c.optim.epochs = 100
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # LARS only
    c.optim.trust_coefficient = 1e-3  # LARS only
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) of the backbone's cls token and mean patch token on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 64 digits.
        c.optim.base_lr = 1e-3 * 256 / 64
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', sd=False, classes=1000, runlocal=False)
    c = ml_collections.ConfigDict()
    c.method = 'sla'
    c.seed = 0
    add_classifier_config(c, arg)
    c.loss = ml_collections.ConfigDict()
    c.loss.rotations = 4  # M: 4 (the reference's 'rotation') or 2 ('rotation2': 0 and 180 degrees)
    c.loss.self_distill = arg.sd  # SLA+SD
    c.loss.temperature = 1.0  # T of the distillation (the reference's default)
    c.loss.large_loss = False  # x M on the joint loss (the reference's --with-large-loss, its ImageNet advice)
    return c
