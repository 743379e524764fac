"""MAE pretraining (He et al., CVPR 2022): 75% random masking, ViT-B/16, L/16, H/14 with a 512-wide 8-block decoder.

Arguments (comma separated after the file name):
  variant=B        model size: B, L, H (H uses patch 14), micro / tiny (tests, CPU); '/patch' overrides the patch
  epochs=800       800 (the paper's ablations) or 1600 (the released models)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/mae.py:variant=L --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/mae.py:runlocal
Reference recipe: facebookresearch/mae PRETRAIN.md and main_pretrain.py
(shared/reference/methods/mae_siammae_cropmae_croco.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=800, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'mae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0  # the reference pretrains without drop path
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False  # unrolled: faster steps on GPUs (docs/performance.md), slower compiles
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.75  # per-sample random masking; the encoder sees int(L * (1 - ratio)) patches

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix_loss = True  # the paper's and PRETRAIN.md's setting (the script's flag defaults to off)

    add_image_input_config(c, runlocal=arg.runlocal)  # RandomResizedCrop (0.2, 1), flip, ImageNet mean / std
    c.input.global_batch = 64 if arg.runlocal else 4096

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1.5e-4  # lr = base_lr * global_batch / 256: 2.4e-3 at 4096
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0  # the reference does not clip
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    # 1-D parameters (biases, norms) never decay; the reference DOES decay cls_token and mask_token (3-D), so no
    # rule exempts them. The position tables are constants, not parameters.
    c.optim.no_decay = ()
    c.optim.lr_rules = ()  # ((regex, multiplier), ...); 0 freezes

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) of the cls token and the mean patch token on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.pictures = 4  # reconstruction pictures written at each evaluation
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 64 digits; a higher lr than the recipe's scaled 3.75e-5 so that
        # something is learnt in that budget.
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
