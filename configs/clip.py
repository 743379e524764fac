"""CLIP pretraining (Radford et al., ICML 2021): contrastive image-text pairs, ViT image tower, causal text tower.

Arguments (comma separated after the file name):
  variant=B/32     B/32, B/16 or L/14 (the paper's ViTs); tiny / micro for CPU runs
  epochs=32        the paper's 32 epochs (of its 400M pairs)
  runlocal         tiny shapes on the built-in MNIST digits with generated captions, for a CPU
Examples:
  --config=configs/clip.py --config.input.captions_csv=/data/cc3m/train.tsv --config.text.tokenizer=/ckpt/clip-b32
      (/ckpt/clip-b32: a transformers CLIP folder, e.g. openai/clip-vit-base-patch32, for its tokenizer.json)
  --config=configs/clip.py --config.model.pretrained=/ckpt/clip-b32 --config.text.tokenizer=/ckpt/clip-b32 ...
  --config=configs/clip.py:runlocal
Reference recipe: open_clip's "params from paper" (lr 5e-4, weight decay 0.2, AdamW betas (0.9, 0.98), eps 1e-6, no
decay on gains and biases, warmup then cosine) and the paper's batch of 32,768; shared/reference/methods/
vision_language_clip_gopro_s3a_vltseg_gfslt_skillnet_stic.md.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.captions import DIGIT_ZERO_SHOT_TEMPLATES, IMAGENET_TEMPLATES
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config

REFERENCE_BATCH = 32768
REFERENCE_LR = 5e-4


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B/32', epochs=32, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'clip'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'tiny' if arg.runlocal else arg.variant
    c.model.pretrained = ''  # a transformers CLIPModel folder to start from (sizes from its config.json)
    c.model.activation = 'quick_gelu'  # OpenAI's; open_clip's non-OpenAI configs use 'gelu'
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters and logits stay float32
    c.model.attention_impl = ''  # '' picks cuDNN flash attention on GPUs for bf16, XLA's otherwise

    c.text = ml_collections.ConfigDict()
    c.text.tokenizer = ''  # a tokenizer.json or a transformers CLIP folder; '' : the built-in captions' own words
    c.text.context_length = 16 if arg.runlocal else 77

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.dataset = 'mnist_digits' if arg.runlocal else 'csv'  # 'csv' (open_clip's format) or 'mnist_digits'
    c.input.captions_csv = ''  # rows of (image path, caption); relative paths are read from the CSV's folder
    c.input.csv_image_key = 'filepath'  # open_clip's --csv-img-key default
    c.input.csv_caption_key = 'title'  # open_clip's --csv-caption-key default
    c.input.csv_separator = '\t'  # open_clip's --csv-separator default
    c.input.crop_scale = (0.9, 1.0)  # open_clip's training RandomResizedCrop
    c.input.hflip = False  # CLIP does not flip (captions say left and right)
    c.input.eval_crop_pct = 1.0  # test view: resize the short side to image_size, centre crop (CLIP's)
    c.input.global_batch = 128 if arg.runlocal else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr x batch / 256: 5e-4 at 32,768
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 0
    c.optim.warmup_steps = 2000  # the paper's 2,000 iterations (open_clip's default is 10,000)
    c.optim.epochs = arg.epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98  # open_clip's ViT values (ResNets: 0.999 / 1e-8)
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.2
    c.optim.clip_grad = 0.0
    # open_clip decays neither 1-D parameters (gains, biases, the class token, the logit scale: never decayed here)
    # nor the position tables (the models' no_weight_decay sets); its token embedding is decayed.
    c.optim.no_decay = ('.*position_embedding',)
    c.optim.lr_rules = ()
    # open_clip clamps the logit scale to [0, ln 100] after every step (the paper's "clipped at 100").
    c.optim.clamp = (('logit_scale', 0.0, 4.605170185988092),)

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.data_root = ''  # labelled class folders <data_root>/<split>/<class>/<image> for probes and zero-shot
    c.eval.train_split = 'train'
    c.eval.split = 'val'
    c.eval.class_names = ()  # zero-shot class names in label order; (): the digits' words or the folder names
    # Prompts per class: the built-in digits' own, or CLIP's seven-template ImageNet ensemble.
    c.eval.zero_shot_templates = DIGIT_ZERO_SHOT_TEMPLATES if arg.runlocal else IMAGENET_TEMPLATES
    if arg.runlocal:
        # A CPU-minutes budget: 300 steps of 128 pairs.
        c.optim.base_lr = 1e-3 * 256 / c.input.global_batch
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.train.log_every = 25
        c.checkpoint.every = 300
        c.eval.at_end = True
    return c
