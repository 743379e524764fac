"""BEATs pretraining, iteration 1 (Chen et al., ICML 2023): predict a frozen random-projection tokenizer's labels of
the masked 16 x 16 fbank patches.

Arguments (comma separated after the file name):
  variant=base     model size: base (12 x 768, 12 heads: every released model); micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic words, for a CPU
Examples:
  --config=configs/beats.py --config.input.data_root=/data/audioset_wav   (<root>/train/<class>/<file>.wav)
  --config=configs/beats.py:runlocal
Reference: microsoft/unilm beats/ (backbone; the released checkpoints' cfg) and the paper's sections 3-4 (tokenizer,
masking, label predictor, recipe: no pretraining code is released); the gaps filled here are marked "assumption"
(shared/reference/methods/audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md, docs/methods.md, BEATs section).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

# The paper: peak lr 5e-4, batches of 5.6k seconds of audio (560 AudioSet clips of 10 s), 400k steps.
REFERENCE_LR, REFERENCE_BATCH = 5e-4, 560


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'beats'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    # The released cfg (BEATs_iter3*.pt): every dropout 0, layer_wise_gradient_decay_ratio 0.6.
    c.model.dropout = 0.0
    c.model.attention_dropout = 0.0
    c.model.activation_dropout = 0.0
    c.model.dropout_input = 0.0
    c.model.layer_grad_decay = 0.6
    # The label predictor's blocks (the paper: "Transformer-based", no size given; assumption: 3, as the
    # tokenizer's estimator), at the encoder's width.
    c.model.predictor_depth = 1 if arg.runlocal else 3

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = 0.75  # random patches, per clip

    c.tokenizer = ml_collections.ConfigDict()
    # 'random_projection' (iteration 1) or 'trained': a configs/beats_tokenizer.py workdir (or a params directory
    # holding 'tokenizer' and 'codebook') at `tokenizer.path`, of `tokenizer.variant` (default: its config's).
    c.tokenizer.kind = 'random_projection'
    c.tokenizer.path = ''
    c.tokenizer.variant = ''
    c.tokenizer.codebook_size = 1024  # the paper's K for every tokenizer
    c.tokenizer.code_dim = 256
    c.tokenizer.seed = 0  # random_projection: draws the frozen projection and codebook

    add_audio_input_config(c, runlocal=arg.runlocal, features='beats_fbank')
    c.input.global_batch = 64 if arg.runlocal else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    # Assumption (the paper names no optimiser): fairseq's Adam of the authors' WavLM / wav2vec 2.0 recipes.
    c.optim.name = 'adamw'
    c.optim.schedule = 'linear'  # warmup, then linear decay to 0 (fairseq's polynomial_decay)
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 32_000  # assumption: WavLM's
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
        c.optim.base_lr = 4e-3  # lr 1e-3 at batch 64
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
