"""TOV-VICReg pretraining (Goulão & Oliveira, "Pretraining the Vision Transformer using self-supervised methods for
vision based Deep Reinforcement Learning", 2022): VICReg on two views of a video frame plus temporal order
verification of the frame and its neighbours k frames before and after.

Arguments (comma separated after the file name):
  variant=Ti/8     ViT size from jaxssl.models.mae's table ('Ti/8': the reference's ViT-Tiny, 192-d, patch 8)
  epochs=10        the reference run's length
  runlocal         tiny shapes on the built-in moving digits, for a CPU
Examples:
  --config=configs/tov_vicreg.py --config.input.list_file=/data/atari/train.csv --config.input.data_root=/data/atari
  --config=configs/tov_vicreg.py:runlocal
Reference recipe: mgoulao/TOV-VICReg (tov_vicreg/, its run script), shared/reference/methods/
simclr_vicreg_dino_poa_uni.md (2b): 84 px observations of DQN-Replay (three stacked grey frames as channels; here
RGB video frames), neighbours 3 frames away, projector 1024-1024-1024, sim = std = cov = 10, temporal 0.1, LARS lr
0.6 x B / 256 at B 512, wd 1e-6, 2 warmup epochs then cosine to 0.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='Ti/8', epochs=10, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'tov_vicreg'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.head_layers = 3  # the reference's default --mlp '1024-1024-1024'
    c.model.head_hidden = 256 if arg.runlocal else 1024
    c.model.head_out = 256 if arg.runlocal else 1024
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters, expander, losses float32
    c.model.scan_layers = False  # LARS's trust ratio is per layer
    c.model.remat = False
    c.model.attention_impl = ''

    c.loss = ml_collections.ConfigDict()
    c.loss.sim_coeff = 10.0  # the run script's (the argparse defaults are VICReg's 25 / 25 / 1)
    c.loss.std_coeff = 10.0
    c.loss.cov_coeff = 10.0
    c.loss.std_eps = 1e-4
    c.loss.temporal_coeff = 0.1  # the TOV binary cross-entropy's weight (argparse default 1)

    c.input = ml_collections.ConfigDict()
    # The clip sources of the video pipeline (jaxssl.data.sources; checked by jaxssl.data.checks).
    c.input.dataset = 'moving_digits' if arg.runlocal else 'list'  # 'list', 'folder', 'tfds', 'moving_digits'
    c.input.data_root = ''
    c.input.list_file = ''
    c.input.list_columns = ''
    c.input.frame_template = 'img_{:05d}.jpg'
    c.input.split = 'train'
    c.input.tfds_name = ''
    c.input.tfds_data_dir = ''
    c.input.tfds_video_key = 'video'
    c.input.tfds_label_key = 'label'
    c.input.cache_dir = '~/.cache/jaxssl'
    c.input.moving_digits_size = 'small'  # 'tiny' (48 clips, tests) or 'small' (3,000 clips)
    # Motion directions (empty: all 8, time-reversible clips on which no head beats the order prior's accuracy);
    # e.g. (0, 1, 7), rightwards only, gives the clips an arrow of time (docs/methods.md, TOV-VICReg).
    c.input.moving_digits_directions = ()
    # The triplet (jaxssl.data.frame_triplets): o_t and its neighbours frame_offset frames away, clamped.
    c.input.frame_offset = 3  # the reference's, = its 3-frame stack: neighbouring observations do not overlap
    # The reference's 84 px with patch 8 makes a 10x10 grid (its strided conv drops the last 4 pixels); 80 px gives
    # the same grid with nothing dropped (the patch embedding here needs a multiple of the patch).
    c.input.image_size = 32 if arg.runlocal else 80
    c.input.crop_scale = (0.08, 1.0)  # the BYOL set's RandomResizedCrop, as the reference's
    c.input.crop_ratio = (3 / 4, 4 / 3)
    c.input.hflip = True
    c.input.interpolation = 'bicubic'
    # (0.4, 0.4, 0.4, 0.1) at p 0.8 (the reference: saturation 0.2; a no-op on grey frames).
    c.input.jitter_strength = 0.5
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2
    # The reference blurs view 1 always and view 2 with p 0.1 (sigma (0.1, 0.2), kernel 7) and solarizes view 2; the
    # shared view function is the same for both views: their average, no solarization (docs/methods.md).
    c.input.blur_prob = 0.0 if arg.runlocal else 0.55
    c.input.eval_crop_pct = 1.0  # probes' view of a middle frame: the whole frame
    c.input.num_sample = 1  # one triplet sample (4 frames) per video
    c.input.global_batch = 32 if arg.runlocal else 512
    c.input.num_workers = 0 if arg.runlocal else 16
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'lars'
    c.optim.base_lr = 0.6  # lr = base_lr * global_batch / 256: 1.2 at 512
    c.optim.min_lr = 0.0  # half-cosine to 0
    c.optim.warmup_epochs = 2
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3
    c.optim.weight_decay = 1e-6
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    # 1-D parameters get neither decay nor LARS adaptation: MoCo-v3's LARS, as the reference.
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Probes of the encoder on a video's middle frame: the digit's class.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        c.optim.base_lr = 1.2
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
