"""GMML pretraining (Atito et al., "GMML is All you Need", 2022): group-corrupted images, whole-image ViT encoding,
L1 reconstruction of the corrupted pixels only.

Arguments (comma separated after the file name):
  variant=S        model size: S (the reference's ViT-S/16), B, L, H; micro / tiny (tests, CPU); '/patch' overrides
  epochs=800       the reference's default (it runs epochs + 1)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/gmml.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/gmml.py:runlocal
Reference recipe: Sara-Ahmed/GMML main.py and datasets/datasets_utils.py (shared/reference/methods/
cae_gmml_sit_mp3_selfie.md): 2 crops of 224 px, scale (0.05, 1), flip, light jitter (p 0.3), blur (p 0.1); corruption
N(0, 1) noise over U(0.5, 0.75) of the pixels, or with p 0.5 blocks of another image over 0.3; reconstruction from
the mean of blocks 6, 8, 10, 12; AdamW lr 5e-4 * B / 256, warmup 10 epochs, cosine to 1e-6, batch 64 per GPU.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='S', epochs=800, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'gmml'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    # Reconstruct from the mean of these blocks' outputs (1-indexed), then the final norm: the reference's '6-8-10-12'.
    c.model.recons_blocks = (1, 2) if arg.runlocal else (6, 8, 10, 12)
    c.model.head_layers = 3  # RECHead: 3 x (Linear, GELU) before the ConvTranspose2d
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.corruption = ml_collections.ConfigDict()
    c.corruption.noise_ratio = 0.75  # --drop_perc: noise over U(min(0.5, r), r) of the pixels
    c.corruption.replace_ratio = 0.3  # --drop_replace: pasted blocks cover U(min(0.5, r), r) = exactly r
    c.corruption.replace_prob = 0.5  # 1 / (drop types + 1) with --drop_type noise
    c.corruption.align = 1  # --drop_align: 1 = pixel rectangles; the patch size aligns them to the token grid
    c.corruption.max_block = 0.3  # the longest side of a block, as a fraction of the image side

    c.loss = ml_collections.ConfigDict()
    c.loss.region = 'corrupted'  # --drop_only 1: L1 over the corrupted entries; 'all': every pixel

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 2  # two global crops per image, both corrupted and reconstructed
    c.input.crop_scale = (0.05, 1.0)  # the reference's global_crops_scale when local_crops_number = 0
    c.input.jitter_strength = 0.125  # jaxssl.data.views: (0.1, 0.1, 0.1, 0.025); the reference's (.1, .1, .1, .01)
    c.input.jitter_prob = 0.3
    c.input.grayscale_prob = 0.0
    c.input.blur_prob = 0.1
    c.input.global_batch = 32 if arg.runlocal else 1024  # images (x 2 views); the reference: 64 per GPU

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 5e-4  # lr = base_lr * global_batch / 256 (views excluded, as the reference's batch_size)
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.04  # the reference ramps it 0.04 -> 0.4 on a cosine; jaxssl.optim keeps it constant
    c.optim.clip_grad = 3.0  # the reference clips each parameter tensor's norm at 3; here the global norm
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters (biases, norms) never decay
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 32 digits (64 views), a higher lr than the recipe's 6.25e-5 at this batch.
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
