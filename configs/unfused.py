"""UNFUSED (Seth et al., ICASSP 2023 SASB): self-distil a teacher's k-means pseudo labels into a fresh AudioNTT CNN.

Arguments (comma separated after the file name):
  runlocal         a narrower student on the built-in synthetic words, for a CPU
Steps (jaxssl/methods/unfused.py):
  1. a teacher run, e.g.  --config=configs/tera.py:runlocal --workdir=runs/teacher
  2. python -m jaxssl.pseudo_labels --workdir=runs/teacher --representation=mean_pool --pca_whiten=128 \
       --l2_normalize --iterations=20 --clusters=32 --out=runs/teacher/pseudo_labels.npy
  3. --config=configs/unfused.py:runlocal --config.input.pseudo_labels=runs/teacher/pseudo_labels.npy
Reference recipe: Sreyan88/LAPE src/upstream/unfused/config.yaml and upstream_expert.py
(shared/reference/methods/audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md, section 6).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

REFERENCE_LR, REFERENCE_BATCH = 0.03, 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'unfused'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # The reference's k-means has k = 32 while its heads have task_label = 99 outputs; the heads are sized to the
    # clusters here (67 of the 99 outputs would never be a target; model.classes=99 gives the reference's heads).
    c.model.classes = 32
    c.model.channels = 64
    c.model.blocks = 3
    c.model.width = 512 if arg.runlocal else 2048  # the reference's d
    c.model.dropout = 0.3

    c.loss = ml_collections.ConfigDict()
    c.loss.exit_weight = 0.7  # alpha: the exits' pseudo-label cross-entropies
    c.loss.kl_weight = 0.3  # beta: KL(classifier || exit)
    c.loss.cosine_weight = 0.003  # gamma: 2 - 2 cos(exit logits, classifier logits)

    add_audio_input_config(c, runlocal=arg.runlocal, features='byola_log_mel')
    c.input.pseudo_labels = ''  # the .npy of step 2: one int label per training clip, in source order
    c.input.global_batch = REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'sgd'  # torch SGD, momentum 0.9, weight decay 1e-4 on every parameter, no lr schedule
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr x global_batch / 256: 0.03 at 64
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4
    c.optim.decay_vectors = True  # torch's weight_decay reaches biases and BatchNorm parameters too
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.min_lr = 0.0
    c.optim.epochs = 50
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.train.steps = 300
        c.train.log_every = 20
        c.checkpoint.every = 300
        c.eval.at_end = True
    return c
