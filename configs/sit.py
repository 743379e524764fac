"""SiT pretraining (Atito et al., "SiT: Self-supervised vIsion Transformer", arXiv v1 2021): GMML's corrupted-image
reconstruction plus 4-way rotation prediction on a rotation token and NT-Xent between two views on a contrastive
token, with learned uncertainty weights.

Arguments (comma separated after the file name):
  variant=B        model size: B (the reference's SiT_base_patch16_224), S, L, H; micro / tiny (tests, CPU)
  epochs=501       the reference's default
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/sit.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/sit.py:runlocal --config.loss.weighting=fixed
Reference recipe: Sara-Ahmed/SiT@1aacd6a main.py, engine.py, losses.py (shared/reference/methods/
cae_gmml_sit_mp3_selfie.md): 2 views (RandomResizedCrop (0.08, 1), flip, jitter 0.4), each rotated by k * 90 degrees;
reconstruction from the final-norm tokens by a ConvTranspose2d, L1 over all pixels; NT-Xent tau 0.5 on a Linear to
512; AdamW lr 5e-4 * B / 512, wd 0.05, warmup 5 epochs, cosine to 1e-5, drop path 0.1, batch 72 per GPU.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=501, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'sit'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    # v1 reconstructs from the last block's output (-1) after the final norm, with the ConvTranspose2d alone.
    c.model.recons_blocks = (-1,)
    c.model.head_layers = 0
    c.model.contrastive_dim = 512
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.corruption = ml_collections.ConfigDict()
    # GMML's plan at v1's strength: v1 draws noise blocks over U(0, 0.3) and pasted blocks over U(0, 0.3) of the
    # image (max_block_sz 0.25); here a view gets noise or a paste over 0.3 (U(min(0.5, r), r) = r).
    c.corruption.noise_ratio = 0.3
    c.corruption.replace_ratio = 0.3
    c.corruption.replace_prob = 0.5
    c.corruption.align = 1  # pixel rectangles, as v1
    c.corruption.max_block = 0.25

    c.loss = ml_collections.ConfigDict()
    c.loss.region = 'all'  # v1: L1 over every pixel of the clean view; 'corrupted': GMML's
    c.loss.temperature = 0.5
    c.loss.weighting = 'uncertainty'  # v1's learned s_t; 'fixed': sum of loss.weights x losses
    c.loss.weights = (1.0, 1.0, 1.0)  # rotation, contrastive, reconstruction (used when weighting = 'fixed')

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 2  # two views per image, each rotated, corrupted and reconstructed
    c.input.crop_scale = (0.08, 1.0)
    c.input.jitter_strength = 0.5  # jaxssl.data.views: (0.4, 0.4, 0.4, 0.1); timm's color_jitter 0.4 has no hue
    c.input.jitter_prob = 1.0
    c.input.grayscale_prob = 0.0
    c.input.blur_prob = 0.0
    c.input.global_batch = 32 if arg.runlocal else 576  # images (x 2 views); the reference: 72 per GPU on 8

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 2.5e-4  # lr = base_lr * global_batch / 256: the reference's 5e-4 * B / 512
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = 5
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0  # the reference does not clip
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters (biases, norms) never decay
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 32 digits (64 views), a higher lr than the recipe's 3.1e-5 at this batch.
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
