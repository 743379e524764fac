"""SiamMAE pretraining (Gupta et al., NeurIPS 2023): two frames of one video, 4 to 47 frames apart, through one ViT
encoder; the earlier frame whole, the later frame 95% masked and reconstructed by a cross-attention decoder.

Arguments (comma separated after the file name):
  variant=S        model size: S (ViT-S/16 with CropMAE's 256-wide 4-block decoder), B, micro / tiny (tests, CPU);
                   '/patch' overrides the patch
  epochs=400       the paper's ablation length (its final models train 2000)
  runlocal         tiny shapes on the built-in moving digits, for a CPU
Examples:
  --config=configs/siammae.py --config.input.list_file=/data/k400/train.csv --config.input.data_root=/data/k400
  --config=configs/siammae.py:runlocal
Reference recipe: the paper's pre-training settings (K400, 224 px, batch 2048, AdamW (0.9, 0.95), base lr 1.5e-4,
wd 0.05, 40 warmup epochs, repeated sampling 2, hflip + crop area [0.5, 1], frame gap [4, 48]; transcribed in
shared/reference/methods/mae_siammae_cropmae_croco.md section 3, not checked against the paper's PDF here) and the
reimplementation in alexandre-eymael/CropMAE (train_siammae_k400.py, data/SiamMAE_PIPE.py, models/SiamMAE.py),
which fixes the frame sampler, the shared crop / flip and the decoder this library implements.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='S', epochs=400, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'siammae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0
    c.model.dropout = 0.1  # the reimplementation's decoder blocks (torch's decoder-layer default)
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = False
    c.model.attention_impl = ''  # the encoder's: '' picks cuDNN flash attention on GPUs in bf16, XLA's elsewhere

    c.masking = ml_collections.ConfigDict()
    # The later frame's mask: int(196 * 0.05) = 9 visible patches at 224 px; int(64 * 0.05) = 3 at runlocal's 8x8.
    c.masking.ratio = 0.95

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix_loss = True

    c.input = ml_collections.ConfigDict()
    # The clip sources of the video pipeline (jaxssl.data.sources; checked by jaxssl.data.checks).
    c.input.dataset = 'moving_digits' if arg.runlocal else 'list'  # 'list', 'folder', 'tfds', 'moving_digits'
    c.input.data_root = ''  # list paths are relative to it; the class-folder root for 'folder'
    c.input.list_file = ''  # 'path 0 -1' (video) or 'frame_dir start_idx total_frames' lines, optional label last
    c.input.list_columns = ''  # '' detects; or e.g. 'path,total,label'
    c.input.frame_template = 'img_{:05d}.jpg'  # file names in frame folders
    c.input.split = 'train'  # moving_digits: train / val; tfds: a split string
    c.input.tfds_name = ''
    c.input.tfds_data_dir = ''
    c.input.tfds_video_key = 'video'
    c.input.tfds_label_key = 'label'
    c.input.cache_dir = '~/.cache/jaxssl'  # where moving_digits is generated on first use
    c.input.moving_digits_size = 'small'  # 'tiny' (48 clips, tests) or 'small' (3,000 clips)
    # The frame pair (jaxssl.data.frame_pairs). Gaps are frames of the video at its own rate, in [low, high) as the
    # reimplementation's randint(4, 48); both ends are clipped to the video's length.
    c.input.frame_gap = (4, 48)
    c.input.image_size = 32 if arg.runlocal else 224
    c.input.crop_scale = (0.5, 1.0)  # one TF-style crop box for both frames
    c.input.crop_ratio = (3 / 4, 4 / 3)
    c.input.hflip = True  # one flip decision for both frames
    c.input.interpolation = 'bilinear'  # the reimplementation's default, antialiased
    c.input.eval_crop_pct = 1.0 if arg.runlocal else 0.875  # probes' test view; the digits move up to the border
    # Repeated sampling 2: each decoded video gives 2 pairs (own gap, crop, flip, mask). The paper's batch of 2048
    # counts pairs: 1024 videos x 2.
    c.input.num_sample = 2
    c.input.global_batch = 32 if arg.runlocal else 1024  # videos per step, pairs = global_batch * num_sample
    c.input.num_workers = 0 if arg.runlocal else 16  # Grain worker processes per host (0: decode in-process)
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    # lr = base_lr * global_batch / 256 here counts videos; the paper's 1.5e-4 scales with its 2048 pairs, so
    # 1.5e-4 * num_sample gives the same peak lr (1.2e-3).
    c.optim.base_lr = 1.5e-4 * 2
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 0.0
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.no_decay = ()  # 1-D parameters never decay; cls_token and mask_token (3-D) do, as MAE's code
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Probes of the encoder on one frame: the digit's class ('direction' / 'speed' need more than one frame).
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget, as CropMAE's runlocal: 60 steps of 32 videos x 2 pairs with a raised lr.
        c.input.moving_digits_size = 'small'
        c.optim.base_lr = 8e-3
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
