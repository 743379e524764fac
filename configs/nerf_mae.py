"""NeRF-MAE (Irshad et al., ECCV 2024): masked autoencoding of radiance grids with a 3-D Swin Transformer.

Arguments (comma separated after the file name):
  runlocal         tiny shapes on the built-in rooms, for a CPU
  variant=swin_s   the reference's backbones: swin_t, swin_s (train_mae3d.sh's), swin_l (its swin_b, width 128,
                   cannot build the 3-D sin-cos table, there or here)
Examples:
  --config=configs/nerf_mae.py                        (built-in rooms at the reference's 160^3)
  --config=configs/nerf_mae.py --config.input.dataset=folder --config.input.data_root=/data/nerfmae
                   (<root>/{train,val}/*.npz with 'rgbsigma' (W, L, H, 4), NeRF-MAE's preprocessed grids; ScanNet:
                   --config.input.density=relu. Hypersim's 200^3 does not fit the decoder's skips, there or here)
  --config=configs/nerf_mae.py:runlocal
Recipe: train_mae3d.sh + run_swin_mae3d.py (zubair-irshad/NeRF-MAE@721b5ee): Swin-S (96, depths 2/2/18/2, heads
3/6/12/24), patch 4, window 4, stochastic depth 0.1, 160^3 grids, mask 0.75 of 4^3-token cubes, AdamW lr 1e-4
weight decay 1e-3 on every parameter, torch's OneCycleLR over the run (lr and Adam's beta1), gradient norm clipped
at 0.1, batch 32, 2000 epochs (the released checkpoint is epoch 1200), random 90-degree turns and flips. Sources:
jaxssl/models/swin3d.py, docs/methods.md.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg

VARIANTS = {  # run_swin_mae3d.py build_model
    'swin_t': dict(width=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)),
    'swin_s': dict(width=96, depths=(2, 2, 18, 2), heads=(3, 6, 12, 24)),
    'swin_l': dict(width=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, runlocal=False, variant='swin_s')
    if arg.variant not in VARIANTS:
        raise ValueError(f"unknown variant '{arg.variant}'; valid: {', '.join(VARIANTS)}")

    c = ml_collections.ConfigDict()
    c.method = 'nerf_mae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    variant = dict(width=24, depths=(2, 2, 2, 2), heads=(1, 2, 4, 8)) if arg.runlocal else VARIANTS[arg.variant]
    c.model.width = variant['width']  # width 2^s at stage s; a multiple of 6 (the 3-D sin-cos table)
    c.model.depths = variant['depths']
    c.model.heads = variant['heads']
    c.model.patch = 4  # voxels per token side
    c.model.window = 4  # tokens per window side
    c.model.drop_path = 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.ratio = 0.75  # train_mae3d.sh --masking_prob
    c.mask.unit = 2 if arg.runlocal else 4  # tokens per masked cube side (the reference's 4 = 16 voxels)

    c.input = ml_collections.ConfigDict()
    c.input.dataset = 'rooms'  # or 'folder'
    c.input.data_root = ''
    c.input.split = 'train'
    c.input.resolution = 32 if arg.runlocal else 160  # grids are zero-padded to this many voxels per side
    c.input.rotate_prob = 0.5  # run_swin_mae3d.py's defaults: a 90-degree turn about the up axis, then flips of
    c.input.flip_prob = 0.5  # each horizontal axis (nerf_rpn/datasets.py augment_rpn_inputs)
    c.input.density = 'log'  # the fourth channel of folder grids: 'log' (Front3D, HM3D, Hypersim), 'relu', 'alpha'
    c.input.num_sample = 1
    c.input.global_batch = 8 if arg.runlocal else 32
    c.input.num_workers = 0 if arg.runlocal else 8
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.base_lr = fixed_lr(c, 1e-3 if arg.runlocal else 1e-4)
    c.optim.min_lr = 0.0  # unused by one_cycle
    c.optim.schedule = 'one_cycle'  # torch's OneCycleLR defaults: 0.3 up, /25 start, /1e4 end
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 2000
    c.optim.weight_decay = 1e-3
    c.optim.decay_vectors = True  # torch AdamW over model.parameters(): biases and norms decay too
    c.optim.clip_grad = 0.1
    c.optim.b1 = 0.9  # unused while optim.one_cycle_beta1 cycles beta1 (0.95 -> 0.85 -> 0.95, OneCycleLR's)
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.eval.split = 'val'
    c.eval.scenes = 16 if arg.runlocal else 64  # val grids for PSNR and the voxel probe's test tokens
    c.eval.probe_scenes = 32 if arg.runlocal else 64  # input.split grids the voxel probe is fitted on
    c.eval.probe_classes = 5  # labels 0..4: the built-in rooms' free, floor, box, sphere, cylinder
    c.eval.probe_tokens = 4096  # at most this many random tokens per grid in the probe (40^3 = 64,000 at 160^3)
    c.eval.batch_size = 8 if arg.runlocal else 4
    c.eval.mask_seed = 0  # the evaluation's masks are fixed
    c.eval.pictures = 2
    c.eval.at_end = True
    if arg.runlocal:
        c.train.steps = 300
        c.train.log_every = 50
        c.checkpoint.every = 300
    return c
