"""Uni4Eye pretraining (Cai et al., MICCAI 2022): one MAE-style ViT for 2-D images and 3-D volumes (a patch
embedding per dimensionality, everything else shared), 75% random masking, and a dual-branch decoder reconstructing
the masked patches' pixels and their Sobel gradient map.

Arguments (comma separated after the file name):
  variant=L        encoder size (MAE's table: B, L, H, micro / tiny for tests and CPUs); '/patch' sets the patch
  runlocal         tiny shapes on the built-in MNIST digits (2-D) and moving-digit volumes (3-D), for a CPU
Examples:
  --config=configs/uni4eye.py:variant=B --config.input.data_root=/data/fundus   (<root>/train/<class>/<image>)
  --config=configs/uni4eye.py:runlocal
The 3-D inputs are always the built-in stand-in (jaxssl.data.volumes: moving-digit clips read as volumes) in place
of OCT scans; no real volume loader exists yet.
Reference recipe: the successor code Davidczy/Uni4Eye_pp (main_pretrain_partial23D.py; the original repository is
not available): ViT-L/16, 200 epochs, 40 warm-up, blr 1e-3, AdamW(0.9, 0.95), wd 0.05, no norm-pix loss
(shared/reference/methods/mmc_further_pretraining_uni4eye_infinite_lr.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='L', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'uni4eye'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.depth_patch = 4 if arg.runlocal else 16  # a 3-D patch is depth_patch x patch x patch (16^3 in the code)
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.75  # the successor code's --mask_ratio (its 2-D/3-D epoch loop hard-codes 0.5)

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix_loss = False  # the successor code's default; applies to both branches' targets
    c.loss.pixel_weight = 1.0  # the paper's branch weights are not known: an unweighted sum
    c.loss.gradient_weight = 1.0
    c.loss.sobel_size = 5  # OpenCV ksize of the successor code's gradient map (3 or 5)

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.global_batch = 32 if arg.runlocal else 1024  # images per step; each image comes with one volume
    c.input.volume_depth = 8 if arg.runlocal else 32  # stand-in volumes: (depth, size, size, 1)
    c.input.volume_size = 32 if arg.runlocal else 64

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1e-3  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40
    c.optim.epochs = 200
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0
    c.optim.warmup_steps = 0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.pictures = 4
    if arg.runlocal:
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
