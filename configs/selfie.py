"""Selfie pretraining (Trinh, Luong, Le 2019): a patch network encodes each patch; an attention pooling network
summarises the visible ones; each masked location's query (pooled vector + row + column embedding) must pick its
patch among the image's masked patches (softmax over dot products, CPC-style).

Arguments (comma separated after the file name):
  epochs=100       pretraining epochs
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/selfie.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/selfie.py:runlocal
Reference recipe: no official code is public (shared/reference/methods/cae_gmml_sit_mp3_selfie.md, section 5).
Confirmed from the paper: 32-px patches on 224-px images (49 patches, 7 + 7 row / column embeddings; 8-px patches
on 32-px images, 16 per-patch embeddings), a learned pooling query u0, candidates = the other masked patches of the
same image, all masked locations scored at once. Ours, not the paper's: P is a small residual conv net with
GroupNorm instead of the first three ResNet-50 blocks (model.patch_widths). Unverified and taken as assumptions: the
masked fraction (0.25; the paper's figure masks 3 of 9), the size of the pooling transformer, and the optimiser
(AdamW, cosine).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, epochs=100, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'selfie'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.patch = 8 if arg.runlocal else 32  # pixels per patch side
    c.model.patch_widths = (16, 32) if arg.runlocal else (64, 128, 256, 512)  # P's blocks; the last is A's width
    # The query's position: 7 + 7 row / column vectors at 224 px, one vector per patch at 32 px (the paper's two cases).
    c.model.position = 'patch' if arg.runlocal else 'row_col'
    c.model.pool_depth = 1 if arg.runlocal else 3  # attention pooling blocks
    c.model.pool_heads = 4 if arg.runlocal else 8
    c.model.layer_norm_eps = 1e-6
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.25  # masked fraction of the patches (the candidates); the rest are visible

    add_image_input_config(c, runlocal=arg.runlocal)  # RandomResizedCrop (0.2, 1), flip, ImageNet mean / std
    c.input.global_batch = 64 if arg.runlocal else 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2.5e-4  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 5
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters (biases, norms) never decay
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) of P's mean patch vector and the attention pool's vector.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        c.optim.base_lr = 4e-3  # a CPU-minute budget: higher than the recipe's scaled lr
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
