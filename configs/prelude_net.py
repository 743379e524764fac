"""PreludeNet (Ziskind, Kim, Burachas, arXiv 2207.02972): a PredNet encoder trained on next-frame prediction, with
depth decoders (infer the current frame's depth, predict the next one's) trained on depth labels; evaluated for
depth, next-frame prediction and invariance to lighting.

Arguments (comma separated after the file name):
  runlocal         tiny shapes on the built-in lit scenes, for a CPU
  hybrid=0.0       model.depth_grad_scale: how much of the depth gradient reaches the encoder (0: the paper's
                   self-supervised encoder; 1: end to end)
Examples:
  --config=configs/prelude_net.py                          (built-in lit scenes at PredNet's KITTI shapes)
  --config=configs/prelude_net.py --config.input.dataset=folder --config.input.data_root=/data/clips
                   (<root>/{train,val}/*.npz: 'frames' (T, H, W, 3) or (K, T, H, W, 3) under K lightings, 'depth')
  --config=configs/prelude_net.py:runlocal
  --config=configs/prelude_net.py:runlocal --config.loss.prednet_weight=0   (random encoder: depth decoders only)
Recipe: PredNet's kitti_train.py (4 layers (3, 48, 96, 192), 3x3 filters, 10 steps, the L_0 loss, Adam 1e-3 then
1e-4 after half of the 150 epochs of 500 clips, batch 4), on square 128 x 128 frames (KITTI's are 128 x 160); the
final weights are evaluated (kitti_train.py keeps those of the best validation loss). The depth decoders' widths,
the depth loss (L1) and its weight are ours: PreludeNet's are not public. Sources: jaxssl/models/prednet.py,
docs/methods.md.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, runlocal=False, hybrid=0.0)

    c = ml_collections.ConfigDict()
    c.method = 'prelude_net'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.stack_sizes = (3, 16, 32) if arg.runlocal else (3, 48, 96, 192)  # A / Ahat channels; [0]: RGB input
    c.model.r_stack_sizes = c.model.stack_sizes  # kitti_train.py: R_stack_sizes = stack_sizes
    c.model.decoder_widths = (16, 16, 32) if arg.runlocal else (32, 48, 96, 192)
    c.model.depth_grad_scale = arg.hybrid
    c.model.dtype = 'float32'  # or 'bfloat16' convolutions (the state, gates and losses stay float32)

    c.loss = ml_collections.ConfigDict()
    c.loss.prednet_weight = 1.0  # 0: no self-supervision (the encoder stays random unless depth_grad_scale > 0)
    c.loss.layer_weights = (1.0,) + (0.0,) * (len(c.model.stack_sizes) - 1)  # L_0; L_all: (1, 0.1, 0.1, ...)
    c.loss.depth_weight = 1.0  # both decoders' L1, on depth / input.depth_scale

    c.input = ml_collections.ConfigDict()
    c.input.dataset = 'lit_scenes'  # or 'folder'
    c.input.data_root = ''
    c.input.split = 'train'
    c.input.image_size = 32 if arg.runlocal else 128  # square frames; KITTI's are 128 x 160
    c.input.frames = 8 if arg.runlocal else 10  # nt
    c.input.lighting = 'random'  # each training clip under a drawn lighting, or always the 'reference' one
    c.input.depth_scale = 20.0  # depth targets are depth / depth_scale (lit_scenes.FAR)
    c.input.num_sample = 1
    c.input.global_batch = 16 if arg.runlocal else 4
    c.input.num_workers = 0 if arg.runlocal else 8
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # Adam without weight decay (Keras's Adam)
    c.optim.base_lr = fixed_lr(c, 2e-3 if arg.runlocal else 1e-3)
    c.optim.min_lr = 0.0  # unused by the step schedule
    c.optim.schedule = 'step'
    c.optim.step_boundaries = (0.5,)  # 1e-3 -> 1e-4 after epoch 75 of 150
    c.optim.step_factor = 0.1
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps is set
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-7  # Keras's value (Keras adds it before the bias correction, optax after: ~3e-6 at step 1)
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 150 * 500 // 4  # kitti_train.py: 150 epochs x 500 samples / batch 4
    c.eval.split = 'val'
    c.eval.scenes = 16 if arg.runlocal else 64  # val clips, each under every eval lighting
    c.eval.batch_size = 8
    c.eval.pictures = 1  # the first val clip under each lighting, written at each evaluation
    c.eval.at_end = True
    if arg.runlocal:
        c.train.steps = 300
        c.train.log_every = 50
        c.checkpoint.every = 300
    return c
