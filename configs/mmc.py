"""MMC pretraining (Wu et al., arXiv 2308.11448): masked image modelling + momentum self-distillation (EMA teacher)
+ global contrast on one ViT, evaluated by frozen probes and zero-shot prompt-patch segmentation.

Arguments (comma separated after the file name):
  variant=B        ViT size from jaxssl.models.mae's table (micro, tiny, B, L, H; '/patch' overrides the patch)
  epochs=100       pretraining epochs (10 of them warm up)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/mmc.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/mmc.py:runlocal
Reference recipe: none public (shared/reference/methods/mmc_further_pretraining_uni4eye_infinite_lr.md: no code, the
paper's text beyond its abstract unavailable). Defaults follow the authors' nearby SiT code (constant EMA 0.996,
InfoNCE temperature 0.2 on the cls token, a 2048 -> 256 projector and predictor) and GMML / CAE block masking of half
the patches; docs/methods.md lists every choice.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=100, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'mmc'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.head_hidden = 128 if arg.runlocal else 2048  # projector and predictor MLP width
    c.model.head_out = 64 if arg.runlocal else 256
    # Teacher momentum (start, end), linear over the run: SiT's constant 0.996; runlocal's few hundred steps take 0.99.
    c.model.ema = (0.99, 0.99) if arg.runlocal else (0.996, 0.996)
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.0 if arg.runlocal else 0.1
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith(('L', 'H'))
    c.model.attention_impl = ''  # '' lets XLA choose; 'cudnn' forces cuDNN flash attention on GPUs

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.5  # block-wise masking of half the patches of each view
    c.masking.min_block = 4 if arg.runlocal else 16  # runlocal's 8x8 grid: the same ~8% share as 16 of 196
    c.masking.min_aspect = 0.3

    c.loss = ml_collections.ConfigDict()
    c.loss.norm_pix = True  # per-patch normalised pixel targets (MAE's)
    c.loss.temperature = 0.2
    c.loss.rec_weight = 1.0
    c.loss.distill_weight = 1.0
    c.loss.contrast_weight = 1.0

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 2  # two views per image: the contrast pairs them, each is also masked for the student
    c.input.crop_scale = (0.2, 1.0) if arg.runlocal else (0.08, 1.0)
    c.input.jitter_strength = 0.5 if arg.runlocal else 1.0
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2
    c.input.blur_prob = 0.0 if arg.runlocal else 0.5
    c.input.global_batch = 64 if arg.runlocal else 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 5e-4  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.clip_grad = 3.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.encoder = 'student'  # or 'teacher': whose features the probes and the segmentation read
    c.eval.seg_images = 256 if arg.runlocal else 1000  # eval-split images for the prompt segmentation; 0: off
    c.eval.seg_threshold = 0.5  # cosine similarity to the prompt patch at or above which a patch is the object
    c.eval.seg_pixel_threshold = 0.5  # the digits' foreground: pixel mean > 0.5 in [0, 1]
    c.eval.seg_fg_fraction = 0.25  # a patch is the object when this share of its pixels is foreground
    if arg.runlocal:
        # A CPU-minute budget as the other image methods' runlocal: 60 steps of 64 digits (128 views).
        c.optim.base_lr = 4e-3
        c.optim.min_lr = 0.0
        c.optim.warmup_steps = 10
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
