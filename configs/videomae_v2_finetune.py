"""VideoMAE V2 fine-tuning (the reference's run_class_finetuning.py + scripts/finetune/*.sh) on the one trainer.

Arguments (comma separated after the file name):
  variant=B        model size: S, B, L, H, g (g uses patch 14); '/patch' overrides the patch
  recipe=k400      k400, ssv2 or k710: the reference script's values for that dataset and size
  layer_decay=0    layer-wise lr decay; 0 takes the recipe's (0.75 for B on K400)
  runlocal         micro model on the built-in moving_digits (input.label_key: direction, label or speed)
Examples:
  --config=configs/videomae_v2_finetune.py:variant=B,recipe=k400 --config.init_from=params/vit_b_pt
      --config.input.list_file=/data/k400/train.csv --config.eval.list_file=/data/k400/val.csv
  --config=configs/videomae_v2_finetune.py:runlocal --config.init_from=runs/videomae_v2_runlocal
  --config=configs/videomae_v2_finetune.py:runlocal --config.input.label_key=speed
`init_from` is a params directory (python -m jaxssl.convert) or a pretraining workdir (its latest checkpoint);
`init_from_select` takes the encoder only (the pretraining decoder and final norm are dropped, the head is fresh).
Reference recipe values: shared/reference/videomae_v2.md ("Fine-tuning & evaluation").
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.models.videomae import VARIANTS
from jaxssl.optim import layer_decay_rules

# The reference scripts' values per (dataset, size): global batch in CLIPS (GPUs x batch per GPU; each clip gives
# num_sample = 2 views), lr (x global batch / 256), layer decay, drop path, head dropout, epochs, warmup epochs,
# weight decay, gradient clipping (0: none), test clips (x 3 crops). Sizes without a script take the K400 row of
# the size (S: B's; the released S is distilled, not fine-tuned).
_FIELDS = (
    'global_batch', 'base_lr', 'layer_decay', 'drop_path', 'head_dropout', 'epochs', 'warmup_epochs',
    'weight_decay', 'clip_grad', 'test_clips',
)  # fmt: skip
_TABLE = {
    ('k400', 'B'): (512, 7e-4, 0.75, 0.1, 0.0, 90, 5, 0.05, 0.0, 5),
    ('k400', 'L'): (192, 2e-3, 0.75, 0.2, 0.0, 35, 5, 0.05, 0.0, 5),
    ('k400', 'H'): (128, 1e-3, 0.8, 0.2, 0.5, 40, 5, 0.05, 0.0, 5),
    ('k400', 'g'): (192, 1e-3, 0.9, 0.2, 0.0, 30, 5, 0.1, 0.0, 5),
    ('ssv2', 'B'): (256, 2e-3, 0.65, 0.1, 0.0, 25, 5, 0.05, 0.0, 2),
    ('ssv2', 'L'): (192, 5e-4, 0.75, 0.2, 0.0, 20, 5, 0.05, 0.0, 2),
    ('ssv2', 'H'): (128, 5e-4, 0.8, 0.2, 0.0, 20, 5, 0.05, 0.0, 2),
    ('ssv2', 'g'): (96, 3e-4, 0.9, 0.25, 0.0, 20, 5, 0.05, 0.0, 2),
    ('k710', 'B'): (512, 7e-4, 0.75, 0.1, 0.0, 90, 5, 0.05, 0.0, 5),
    ('k710', 'H'): (128, 1e-3, 0.8, 0.2, 0.5, 40, 5, 0.05, 0.0, 5),
    ('k710', 'g'): (96, 1e-3, 0.9, 0.3, 0.0, 35, 5, 0.1, 5.0, 5),
    # runlocal: 600 steps, 1-2 minutes on a 2-core CPU, micro model, moving_digits (lr 1e-3 after batch scaling); fewer
    # epochs stay at chance (the from-scratch ViT plateaus at uniform predictions for ~2 epochs).
    ('moving_digits', 'micro'): (16, 1.6e-2, 0.75, 0.1, 0.0, 4, 0, 0.05, 0.0, 2),
}
RECIPES = {key: dict(zip(_FIELDS, row, strict=True)) for key, row in _TABLE.items()}
CLASSES = {'k400': 400, 'ssv2': 174, 'k710': 710}


def recipe_for(dataset: str, size: str) -> dict:
    size = 'B' if size == 'S' else size
    return RECIPES.get((dataset, size)) or RECIPES.get(('k400', size)) or RECIPES[('k400', 'B')]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', recipe='k400', layer_decay=0.0, runlocal=False)
    size = 'micro' if arg.runlocal else arg.variant.partition('/')[0]
    dataset = 'moving_digits' if arg.runlocal else arg.recipe
    # An unknown size or recipe falls back to B / K400 here; check_config then names the bad variant.
    recipe = recipe_for(dataset, size)
    ssv2 = dataset == 'ssv2'

    c = ml_collections.ConfigDict()
    c.method = 'videomae_finetune'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/8' if arg.runlocal else arg.variant
    c.model.num_classes = 0 if arg.runlocal else CLASSES.get(arg.recipe, 400)  # 0: from the data (moving_digits)
    c.model.tubelet = 2
    c.model.pos_embedding = 'sincos'
    c.model.layer_norm_eps = 1e-6
    c.model.layer_scale_init = 0.0
    c.model.drop_path_rate = recipe['drop_path']
    c.model.head_dropout = recipe['head_dropout']
    c.model.init_scale = 0.001  # head weights x 0.001 at init
    c.model.use_mean_pooling = True  # mean pool + fc_norm (the pretrained encoder's final norm is dropped)
    c.model.dtype = 'bfloat16'
    c.model.scan_layers = False  # unrolled: 1.26x faster ViT-B steps than scan on an H200, 2x compile time
    c.model.remat = size in ('H', 'g')
    c.model.attention_impl = ''
    c.model.patch_embed_impl = 'matmul'

    c.input = ml_collections.ConfigDict()
    c.input.frames = 8 if arg.runlocal else 16
    c.input.image_size = 32 if arg.runlocal else 224
    c.input.sampling_stride = 4  # frames between sampled frames ('clip' sampling)
    c.input.temporal_sampling = 'segments' if ssv2 else 'clip'  # 'segments': one frame per segment (SSv2)
    c.input.num_sample = 2  # repeated augmentation: views per decoded clip
    c.input.global_batch = recipe['global_batch']  # clips, views excluded
    # moving_digits: 'direction' (8 motion classes; the runlocal default), 'label' (digit) or 'speed' (2).
    c.input.label_key = 'direction' if arg.runlocal else 'label'
    c.input.dataset = 'moving_digits' if arg.runlocal else 'list'  # 'list', 'folder', 'tfds', 'moving_digits'
    c.input.data_root = ''
    c.input.list_file = ''  # fine-tuning lists: 'path label' (videos) or 'frame_dir start total label'
    c.input.list_columns = ''
    c.input.frame_template = 'img_{:05d}.jpg'
    c.input.split = 'train'
    c.input.tfds_name = ''
    c.input.tfds_data_dir = ''
    c.input.tfds_video_key = 'video'
    c.input.tfds_label_key = 'label'
    c.input.cache_dir = '~/.cache/jaxssl'
    c.input.moving_digits_size = 'small'
    c.input.moving_digits_scale = 1.0  # the zoomed / blurred variant, as in configs/videomae_v2.py
    c.input.moving_digits_blur = 0.0
    c.input.num_workers = 0 if arg.runlocal else 16
    c.input.read_threads = 2 if arg.runlocal else 1

    c.augment = ml_collections.ConfigDict()
    c.augment.auto_augment = 'rand-m7-n4-mstd0.5-inc1'  # '' disables RandAugment
    # No flip for Something-Something V2 (left / right labels), nor moving_digits (directions, mirrored digits).
    c.augment.flip = not (ssv2 or arg.runlocal)
    c.augment.erase_prob = 0.25  # random erasing, one box for all frames
    c.augment.crop_scale = (0.08, 1.0)  # random resized crop: area fraction
    c.augment.crop_ratio = (0.75, 1.3333)  # and aspect ratio range

    c.mixup = ml_collections.ConfigDict()
    c.mixup.mixup_alpha = 0.8  # 0 disables Mixup
    c.mixup.cutmix_alpha = 1.0  # 0 disables CutMix
    c.mixup.prob = 1.0  # probability of mixing a batch
    c.mixup.switch_prob = 0.5  # CutMix instead of Mixup when both are enabled

    c.loss = ml_collections.ConfigDict()
    c.loss.label_smoothing = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = recipe['base_lr']  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = recipe['warmup_epochs']
    c.optim.warmup_steps = 15 if arg.runlocal else 0  # > 0 overrides warmup_epochs
    c.optim.epochs = recipe['epochs']
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = recipe['weight_decay']
    c.optim.clip_grad = recipe['clip_grad']
    # The reference's fine-tuning no-decay set: 1-D params (norms, biases, layer scale), biases, pos_embed, cls_token.
    c.optim.no_decay = ('.*bias', '.*pos_embed.*', '.*cls_token')
    depth, decay = VARIANTS.get(size, VARIANTS['B'])['depth'], arg.layer_decay or recipe['layer_decay']
    c.optim.lr_rules = layer_decay_rules(depth, decay)  # ((regex, multiplier), ...); 0 freezes

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.init_from_select = ('patch_embed/.*', 'pos_embed/.*', 'encoder/.*')
    c.eval.at_end = True
    c.eval.split = 'val'  # moving_digits / tfds split; list and folder datasets use eval.list_file / eval.data_root
    c.eval.list_file = ''
    c.eval.data_root = ''
    c.eval.num_clips = recipe['test_clips']  # uniformly spaced clips ('segments': segment offsets) ...
    c.eval.num_crops = 3  # ... x spatial crops along the long side; softmax averaged over all views
    c.eval.batch_size = 32 if arg.runlocal else 64  # clips per evaluation step (rounded up to the devices)
    c.eval.max_clips = 0  # > 0: an evenly spaced subset (cheap online evaluation)
    if arg.runlocal:
        c.train.log_every = 10
        c.checkpoint.every = 100
    return c
