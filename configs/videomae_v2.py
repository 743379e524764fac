"""VideoMAE V2 pretraining (Wang et al., CVPR 2023): tube + running-cell dual masking, ViT-S/B/L/H/g.

Arguments (comma separated after the file name):
  variant=B        model size: S, B, L, H, g (g uses patch 14), micro (tests); '/patch' overrides the patch
  runlocal         tiny shapes for a CPU
  decoder_ratio=0.5  running-cell decoder mask ratio; 0 gives VideoMAE v1
Examples:
  --config=configs/videomae_v2.py:variant=L
  --config=configs/videomae_v2.py:runlocal --config.masking.encoder_ratio=0.75
Reference recipe values: shared/reference/videomae_v2.md ("Pretraining optimisation").
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.evaluate.frozen import add_probe_config

# Per-variant recipe of the reference scripts (scripts/pretrain/vit_*_hybrid_pt.sh): global batch in CLIPS
# (GPUs x 32 per GPU; each clip gives num_sample = 4 views, so a step sees 4x as many samples), base lr, epochs,
# warmup epochs, gradient clipping, remat. The V2 release has no ViT-S pretraining script (its S is distilled
# from g); S uses B's recipe.
RECIPES = {
    'S': dict(global_batch=1024, base_lr=1e-3, epochs=200, warmup_epochs=20, clip_grad=0.0, remat=False),
    'B': dict(global_batch=1024, base_lr=1e-3, epochs=200, warmup_epochs=20, clip_grad=0.0, remat=False),
    'L': dict(global_batch=1536, base_lr=1e-3, epochs=300, warmup_epochs=30, clip_grad=0.0, remat=False),
    'H': dict(global_batch=2048, base_lr=1e-3, epochs=300, warmup_epochs=30, clip_grad=0.0, remat=True),
    'g': dict(global_batch=2048, base_lr=6e-4, epochs=300, warmup_epochs=30, clip_grad=0.02, remat=True),
    # runlocal: a few CPU minutes on the built-in moving digits (lr 1e-3 after batch scaling).
    'micro': dict(global_batch=32, base_lr=8e-3, epochs=3, warmup_epochs=0, clip_grad=0.0, remat=False),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', runlocal=False, decoder_ratio=0.5)
    size = arg.variant.partition('/')[0]
    # An unknown size falls back to B here; the method's check_config then reports it by name.
    recipe = RECIPES['micro'] if arg.runlocal else RECIPES.get(size, RECIPES['B'])

    c = ml_collections.ConfigDict()
    c.method = 'videomae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/8' if arg.runlocal else arg.variant
    c.model.tubelet = 2
    c.model.pos_embedding = 'sincos'  # the reference's fixed table; 'learned' for a trainable one
    c.model.layer_norm_eps = 1e-6
    c.model.layer_scale_init = 0.0  # no released pretraining script enables layer scale
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'bfloat16'  # compute dtype; parameters stay float32
    # Stacked layer parameters with the loop fully unrolled: on an H200 1.14x faster ViT-B steps than unscanned
    # layers (few large leaves: fewer optimiser kernels); a rolled scan was 1.26x slower (docs/performance.md).
    c.model.scan_layers = True
    c.model.scan_unroll = 0  # layers per loop iteration of the scan; 0 = all
    c.model.remat = recipe['remat']
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'
    c.model.patch_embed_impl = 'matmul'  # tubelet embedding as reshape + matmul, or 'conv' (same parameters)
    # Throughput levers (docs/performance.md): q, k, v as three matmuls (same parameters and numbers; 1.01x on an
    # H200), the tanh GELU (not the reference's erf form; 1.05x), and the GELU recomputed in the backward (same
    # numbers, fewer activations kept; not yet measured on a GPU).
    c.model.split_qkv = False
    c.model.approximate_gelu = False
    c.model.recompute_gelu = False

    c.masking = ml_collections.ConfigDict()
    c.masking.encoder_ratio = 0.9  # tube masking
    c.masking.decoder_ratio = arg.decoder_ratio  # running cell; 0 = VideoMAE v1

    c.loss = ml_collections.ConfigDict()
    c.loss.normalize_target = True  # per-tube, per-channel normalised pixels (the reference default)

    c.input = ml_collections.ConfigDict()
    c.input.frames = 8 if arg.runlocal else 16
    c.input.image_size = 32 if arg.runlocal else 224
    c.input.sampling_stride = 4  # 2 for Something-Something V2
    c.input.num_sample = 1 if arg.runlocal else 4  # repeated augmentation: crops + masks per decoded clip
    c.input.global_batch = recipe['global_batch']  # clips, views excluded
    # Data (jaxssl.data; jaxssl.data.check_input_config validates these).
    c.input.dataset = 'moving_digits' if arg.runlocal else 'list'  # 'list', 'folder', 'tfds', 'moving_digits'
    c.input.data_root = ''  # list paths are relative to it; the class-folder root for 'folder'
    c.input.list_file = ''  # 'path 0 -1' (video) or 'frame_dir start_idx total_frames' lines, optional label last
    c.input.list_columns = ''  # '' detects; or e.g. 'path,total,label' for frame lists without start_idx
    c.input.frame_template = 'img_{:05d}.jpg'  # file names in frame folders
    c.input.split = 'train'  # moving_digits: train / val; tfds: a split string
    c.input.tfds_name = ''
    c.input.tfds_data_dir = ''
    c.input.tfds_video_key = 'video'  # encoded video bytes, or uint8 (T, H, W, 3) frames
    c.input.tfds_label_key = 'label'
    c.input.cache_dir = '~/.cache/jaxssl'  # where moving_digits is generated on first use
    c.input.moving_digits_size = 'small'  # 'tiny' (48 clips, tests) or 'small' (3,000 clips)
    # A moving_digits variant: digits zoomed by this factor and Gaussian-blurred (sigma px), so hidden tubes are
    # predictable from their neighbours (jaxssl/data/moving_digits.py; docs/methods.md, VideoMAE V2).
    c.input.moving_digits_scale = 1.0
    c.input.moving_digits_blur = 0.0
    c.input.num_workers = 0 if arg.runlocal else 16  # Grain worker processes per host (0: decode in-process)
    c.input.read_threads = 2 if arg.runlocal else 1  # batches assembled concurrently per process (memory: 1 batch each)

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = recipe['base_lr']  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 1e-5
    c.optim.warmup_epochs = recipe['warmup_epochs']
    c.optim.epochs = recipe['epochs']
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = recipe['clip_grad']  # 0 disables clipping
    c.optim.warmup_steps = 20 if arg.runlocal else 0  # > 0 overrides warmup_epochs
    # No weight decay for these (nor for any 1-D parameter): biases, norms, position table, mask token, layer scale.
    c.optim.no_decay = ('.*bias', '.*scale', '.*pos_embed.*', '.*mask_token', '.*cls_token', '.*gamma_[12]')
    c.optim.lr_rules = ()  # ((regex, multiplier), ...); 0 freezes

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) on the eval split; moving_digits labels digit identity and motion.
    add_probe_config(c, label_keys=('label', 'direction', 'speed'), runlocal=arg.runlocal)
    c.eval.pictures = 2  # reconstruction pictures (PNG grid + GIF) written at each evaluation
    if arg.runlocal:
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 100
    return c
