"""CropMAE pretraining (Eymaël et al. 2024): two crops of one image through one ViT encoder, the global crop whole,
the local crop (cut from the global one) 98.5% masked and reconstructed by a cross-attention decoder.

Arguments (comma separated after the file name):
  variant=S        model size: S (the reference's ViT-S/16, 256-wide 4-block decoder), B, micro / tiny (tests, CPU);
                   '/patch' overrides the patch
  epochs=400       the reference scripts' length on ImageNet
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/cropmae.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/cropmae.py:runlocal
Reference recipe: alexandre-eymael/CropMAE scripts/*.sh, misc/util.py, data/util/CropMAEStrategies.py
(shared/reference/methods/mae_siammae_cropmae_croco.md, section 3).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='S', epochs=400, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'cropmae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0  # the reference pretrains without drop path
    c.model.dropout = 0.1  # the decoder blocks' attention, FFN and residual dropout (torch's decoder-layer default)
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = False
    c.model.attention_impl = ''  # the encoder's: '' picks cuDNN flash attention on GPUs in bf16, XLA's elsewhere

    c.masking = ml_collections.ConfigDict()
    # The local view's mask: int(196 * (1 - 0.985)) = 2 visible patches at 224 px. At runlocal's 8x8 grid 0.985
    # would keep int(0.96) = 0, so runlocal keeps int(64 * 0.05) = 3.
    c.masking.ratio = 0.95 if arg.runlocal else 0.985

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix_loss = True  # the scripts pass --norm_pix_loss

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.crop_scale = (0.1, 1.0)  # the global crop's area on ImageNet (the reference uses (0.5, 1) on K400)
    c.input.local_crop_scale = (0.3, 0.6)  # the local crop's area, as a fraction of the global crop
    c.input.interpolation = 'bilinear'  # torchvision v2 RandomResizedCrop's default, antialiased
    c.input.global_batch = 64 if arg.runlocal else 2048  # 128 per GPU x 16

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1e-4  # lr = base_lr * global_batch / 256: 8e-4 at 2048
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = arg.epochs // 20  # 5% warmup: 20 of 400 epochs
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0  # the reference does not clip
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters never decay; cls_token and mask_token (3-D) do, as the reference
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget, as MAE's runlocal: 60 steps of 64 digits with a raised lr.
        c.optim.base_lr = 4e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
