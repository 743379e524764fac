"""MP3 pretraining (Zhai et al., "Position Prediction as an Effective Pretraining Strategy", ICML 2022): a ViT
without position embeddings; all patches query, a random 25% context is keyed; each patch classifies its position.

Arguments (comma separated after the file name):
  variant=B        encoder size from MAE's table: B, L, H, micro / tiny (tests, CPU); '/patch' overrides the patch
  epochs=100       pretraining epochs
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/mp3.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/mp3.py:runlocal
Reference recipe: no official code is public (shared/reference/methods/cae_gmml_sit_mp3_selfie.md, section 4).
Confirmed from the paper: no position embeddings, Q = all patches and K = V = the context, N-way position CE per
token, position embeddings added back for fine-tuning (not done here). Unverified and taken as assumptions: the
masking ratio 0.75 (ImageNet; about 0.5 on CIFAR) and a DeiT-style AdamW recipe (lr 5e-4 x B / 512, wd 0.05).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=100, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'mp3'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.75  # the context (keys / values) is int(N * (1 - ratio)) random patches per sample

    add_image_input_config(c, runlocal=arg.runlocal)  # RandomResizedCrop (0.2, 1), flip, ImageNet mean / std
    c.input.global_batch = 64 if arg.runlocal else 4096

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2.5e-4  # lr = base_lr * global_batch / 256 (DeiT's 5e-4 x B / 512)
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
    # Frozen-feature probes (linear, kNN) of the mean token on the eval split (no cls token: nothing else is pooled).
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        c.optim.base_lr = 4e-3  # a CPU-minute budget: higher than the recipe's scaled lr
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
