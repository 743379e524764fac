"""CAE pretraining (Chen et al., IJCV 2023): block-wise masking of 98 of 196 patches, a ViT encoder on the visible
patches, a 4-block latent contextual regressor, a 4-block decoder, alignment loss weight 2.

Arguments (comma separated after the file name):
  variant=B        model size: B, L (encoder, regressor and decoder widths per the reference scripts),
                   micro / tiny (tests, CPU); '/patch' overrides the patch
  epochs=300       300, 800 or 1600 (the reference's runs; warmup 10 / 20 / 40 epochs)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/cae.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/cae.py:runlocal
Reference recipe: Atten4Vis/CAE scripts/cae_base_300e.sh, tools/run_pretraining.py, furnace/
(shared/reference/methods/cae_gmml_sit_mp3_selfie.md). The decoder reconstructs (per-patch normalised) pixels, not
the reference's DALL-E token ids (no DALL-E tokenizer offline; docs/methods.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config

WARMUP_EPOCHS = {300: 10, 800: 20, 1600: 40}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=300, runlocal=False)
    large = arg.variant.startswith('L')

    c = ml_collections.ConfigDict()
    c.method = 'cae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.layer_norm_eps = 1e-6
    c.model.layer_scale_init = 1e-5 if large else 0.1  # the encoder's (--layer_scale_init_value)
    c.model.dec_layer_scale_init = 0.1  # regressor and decoder blocks (--decoder_layer_scale_init_value)
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1  # encoder, regressor and decoder (--drop_path 0.1)
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = large
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.masking = ml_collections.ConfigDict()
    # BEiT block-wise masking of L - int(L * (1 - ratio)) tokens: 98 of 196 (--num_mask_patches 98).
    c.masking.ratio = 0.5
    # Each block's target area is at least min_block tokens (--min_mask_patches_per_block 16 of 196); runlocal's 8x8
    # grid takes 4 (the same share of the grid, about 8%).
    c.masking.min_block = 4 if arg.runlocal else 16
    c.masking.min_aspect = 0.3  # aspect ratio log-uniform in [0.3, 1 / 0.3]

    c.loss = ml_collections.ConfigDict()
    c.loss.align_weight = 2.0  # --align_loss_weight 2 in every reference script
    c.loss.norm_pix_loss = True  # pixel target per-patch normalised (MAE's); the reference predicts DALL-E ids

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.crop_scale = (0.08, 1.0)  # --crop_min_size 0.08; bicubic, flip; no colour jitter (--color_jitter 0)
    c.input.global_batch = 64 if arg.runlocal else 2048  # 64 per GPU x 32

    c.optim = ml_collections.ConfigDict()
    # The reference's lr is absolute (1.5e-3 at batch 2048); here lr = base_lr * global_batch / 256, which gives
    # 1.5e-3 at 2048 (and min_lr 1e-5 likewise).
    c.optim.base_lr = 1.5e-3 * 256 / 2048
    c.optim.min_lr = 1e-5 * 256 / 2048
    c.optim.warmup_epochs = WARMUP_EPOCHS.get(arg.epochs, arg.epochs // 30)
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 3.0
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    # 1-D parameters (biases, norms, layer-scale gammas) never decay; the reference decays cls_token and mask_token
    # (it exempts parameters with < 2 dimensions only), so no rule exempts them.
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.pictures = 4  # reconstruction pictures written at each evaluation
    if arg.runlocal:
        # A CPU-minute budget as MAE's runlocal: 60 steps of 64 digits with a raised lr.
        c.optim.base_lr = 4e-3
        c.optim.min_lr = 0.0
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
