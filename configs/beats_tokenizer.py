"""BEATs tokenizer training (Chen et al., ICML 2023, section 3.3): a self-distilled acoustic tokenizer for the next
pretraining iteration, from a frozen BEATs teacher.

Arguments (comma separated after the file name):
  variant=base     the tokenizer's size: base (12 x 768, as the released Tokenizer_iter*.pt); micro (tests, CPU)
  runlocal         a micro tokenizer on the built-in synthetic words, for a CPU
Examples:
  --config=configs/beats_tokenizer.py --config.teacher.path=runs/beats_iter1 --config.input.data_root=/data/audio
  --config=configs/beats_tokenizer.py:runlocal --config.teacher.path=runs/beats_runlocal
Then the next iteration: --config=configs/beats.py --config.tokenizer.kind=trained --config.tokenizer.path=<workdir>.
Reference: microsoft/unilm beats/Tokenizers.py and quantizer.py (tokenizer, quantizer) and the paper (estimator,
objective, recipe: no training code is released); assumptions are marked (docs/methods.md, BEATs section).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

# The paper: batches of 1.4k seconds (140 clips of 10 s), 400k steps, peak lr 5e-5 with a self-supervised teacher
# (5e-4 with a fine-tuned one).
REFERENCE_LR, REFERENCE_BATCH = 5e-5, 140


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'beats_tokenizer'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.estimator_depth = 3  # the paper's 3-layer Transformer estimator, at the tokenizer's width

    c.quantizer = ml_collections.ConfigDict()  # NormEMAVectorQuantizer as Tokenizers.py builds it
    c.quantizer.codebook_size = 1024
    c.quantizer.code_dim = 256
    c.quantizer.decay = 0.99
    c.quantizer.beta = 1.0  # weight of ||sg(z_q) - z||^2
    c.quantizer.kmeans_iterations = 10

    c.teacher = ml_collections.ConfigDict()
    c.teacher.path = ''  # a configs/beats.py workdir, or a params directory holding 'backbone'
    c.teacher.variant = ''  # default: the teacher run's config

    add_audio_input_config(c, runlocal=arg.runlocal, features='beats_fbank')
    c.input.global_batch = 64 if arg.runlocal else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    # Assumption (the paper names no optimiser): the pretraining's.
    c.optim.name = 'adamw'
    c.optim.schedule = 'linear'
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 32_000  # assumption, as the pretraining
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 400_000
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.quantizer.codebook_size = 256  # the built-in words' 64 clips x 24 patches per batch cannot spread 1,024
        c.optim.base_lr = 4e-3  # lr 1e-3 at batch 64
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
