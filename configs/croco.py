"""CroCo v2 pretraining (Weinzaepfel et al., ICCV 2023): cross-view completion. View 1 is 90% masked and
reconstructed by a decoder that cross-attends to the whole of view 2; 2-D RoPE (base 100) in every attention.

Arguments (comma separated after the file name):
  variant=B+S      model size '<encoder>+<decoder>': B+S (ViT-B/16, 512-wide 8-block decoder: CroCo v1 and
                   CroCo_V2_ViTBase_SmallDecoder), B+B, L+B (768-wide 12-block decoder); micro / tiny (tests, CPU);
                   '/patch' overrides the patch
  pos=rope         'rope' (v2, RoPE100) or 'cosine' (v1, fixed 2-D sin-cos added to the tokens)
  epochs=400       the reference's stopping epoch (--max_epoch 400)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/croco.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/croco.py:variant=L+B
  --config=configs/croco.py:runlocal
Data: the reference pretrains on pairs of real views of one scene; no such source is built in, so the views are a
STAND-IN made from one image (jaxssl.methods.croco.croco_views: two crops with a small offset, own colour jitter).
Reference recipe: naver/croco pretrain.py, models/croco.py, datasets/transforms.py, README.MD
(shared/reference/methods/mae_siammae_cropmae_croco.md, section 4): AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 x batch /
256, batch 64 x 4 GPUs = 256, warmup 40, norm-pix loss, mask 0.9. The reference sizes its cosine to --epochs 800 and
stops at --max_epoch 400 (lr ends near 0.54x peak); the one trainer here sizes the cosine to the run, so this
config decays over 400 epochs to 0. CroCo v2-L: variant=L+B, batch 512, warmup 12, 125 of 250 epochs, no AMP.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B+S', pos='rope', epochs=400, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'croco'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.pos_embed = arg.pos
    c.model.rope_base = 100.0  # RoPE100
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0  # the reference pretrains without drop path
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = False
    c.model.attention_impl = ''  # the encoder's: '' picks cuDNN flash attention on GPUs in bf16, XLA's elsewhere

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.9  # int(0.9 * 196) = 176 masked, 20 visible at 224 px; 57 of 64 at runlocal's 8x8 grid

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix_loss = True  # pretrain.py --norm_pix_loss 1

    add_image_input_config(c, runlocal=arg.runlocal)
    # The stand-in pair: a random resized crop to image_size + max_shift px, then two independent image_size crops.
    c.input.crop_scale = (0.2, 1.0)
    c.input.max_shift = 4 if arg.runlocal else 32  # one patch at runlocal's 4 px patches, two at 224 px / 16
    c.input.color_jitter = 0.4  # the reference's 'acolor': brightness, contrast, saturation ~ U(0.6, 1.4), no hue
    c.input.hflip = False  # the reference does not flip
    c.input.global_batch = 64 if arg.runlocal else 256  # 64 per GPU x 4

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1.5e-4  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0  # the reference does not clip
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters never decay; mask_token (3-D) does, as the reference
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget, as CropMAE's runlocal: 60 steps of 64 digits with a raised lr.
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
