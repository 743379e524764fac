"""wav2vec 2.0 pretraining (Baevski et al., NeurIPS 2020): contrast masked context vectors with quantized latents;
from scratch or continued from released weights (XLSR-53 adapted to a new language, as the Ainu wav2vec 2.0).

Arguments (comma separated after the file name):
  variant=base     base (12 x 768, wav2vec2_base_librispeech.yaml), large (24 x 1024, pre-norm, layer-norm feature
                   encoder, wav2vec2_large_librivox.yaml: the architecture of XLSR-53); micro (tests, CPU)
  continue         continued pretraining of a released model (set model.pretrained to its transformers folder):
                   the large recipe's losses and input, lr 5e-5, 100k steps, the Gumbel temperature at its floor
  runlocal         a micro model on the built-in synthetic words, for a CPU
Examples:
  --config=configs/wav2vec2.py --config.input.data_root=/data/librispeech_wav   (<root>/train/<class>/<file>.wav)
  --config=configs/wav2vec2.py:variant=large,continue --config.model.pretrained=/ckpt/wav2vec2-large-xlsr-53
  --config=configs/wav2vec2.py:runlocal
Reference recipes: fairseq examples/wav2vec/config/pretraining/wav2vec2_{base_librispeech,large_librivox}.yaml and
the Wav2Vec2Config defaults (shared/reference/methods/audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

# Crops of max_sample_size per update in the reference: 1.4M samples x 64 GPUs / 250k (base), 1.2M x 128 / 320k
# (large). An upper bound on utterances: batches cut to their shortest hold more, shorter ones.
REFERENCE_BATCH = {'base': 358, 'large': 480}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False, **{'continue': False})
    large = arg.variant == 'large'
    proceed = arg['continue']

    c = ml_collections.ConfigDict()
    c.method = 'wav2vec2'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.pretrained = ''  # a transformers Wav2Vec2ForPreTraining folder: its sizes and weights replace `variant`
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.dropout = 0.0 if large else 0.1  # hidden dropout (blocks, after the positional conv)
    c.model.attention_dropout = 0.0 if large else 0.1
    c.model.dropout_input = 0.0 if large else 0.1  # on the projected latents
    c.model.dropout_features = 0.0 if large else 0.1  # on the quantizer's input
    c.model.layerdrop = 0.0 if large else 0.05
    c.model.feature_grad_mult = 1.0 if large else 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.prob = 0.65  # span starts per frame, before overlaps (about 49% of frames end up masked)
    c.mask.length = 10  # frames (200 ms)
    c.mask.min_spans = 2

    c.quantizer = ml_collections.ConfigDict()
    c.quantizer.temperature = (2.0, 0.1, 0.999995) if large else (2.0, 0.5, 0.999995)  # (start, floor, decay)
    c.quantizer.start_step = -1  # updates already taken; -1: 0 from scratch, the floor for model.pretrained

    c.loss = ml_collections.ConfigDict()
    c.loss.num_negatives = 100
    c.loss.logit_temp = 0.1
    c.loss.diversity_weight = 0.1
    c.loss.feature_penalty_weight = 0.0 if large else 10.0
    c.loss.reference_batches = 0  # groups for the per-GPU terms (module docs); 0: one per device

    add_audio_input_config(c, runlocal=arg.runlocal, features='waveform')
    c.input.max_samples = 16000 if arg.runlocal else (320_000 if large else 250_000)  # max_sample_size
    c.input.normalize_waveform = large  # the large / XLSR models standardise each file
    c.input.min_samples = 0 if arg.runlocal else 32_000  # min_sample_size: shorter files are skipped (2 s)
    c.input.bucket_by_length = not arg.runlocal  # each device's rows of similar length, as fairseq's sorted batches
    # The reference batches by 1.4M (base) / 1.2M (large) samples per GPU on 64 / 128 GPUs, REFERENCE_BATCH crops
    # of the longest length; the default is smaller, and the lr follows the batch linearly (below).
    c.input.global_batch = 16 if arg.runlocal else 64

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # fairseq's adam: decoupled weight decay on every parameter
    c.optim.schedule = 'linear'  # polynomial_decay (power 1): linear warmup, then linear decay to 0
    # lr = base_lr * global_batch / 256: the yaml's lr at the reference batch (5e-4 base, 0.005 large).
    c.optim.base_lr = (0.005 if large else 5e-4) * 256 / REFERENCE_BATCH['large' if large else 'base']
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 32_000
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.decay_vectors = True  # biases and norms decay too, as fairseq's adam
    c.optim.clip_grad = 0.0  # fairseq's clip_norm default: none
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 1_000_000 if large else 400_000
    if proceed:
        # Continued pretraining (the Ainu wav2vec 2.0: 100k steps on 234 h from XLSR-53, per its model card). Its
        # learning rate is not published; 5e-5 with 10k warmup steps is a conservative choice, not the authors'.
        c.optim.base_lr = 5e-5 * 256 / REFERENCE_BATCH['large' if large else 'base']
        c.optim.warmup_steps = 10_000
        c.train.steps = 100_000
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        # 4x the base lr: the contrastive loss sits at its chance value log(101) for the first steps (as the
        # reference's early updates); 2e-3 leaves that plateau after 100-300 steps, 5e-4 after about 450.
        c.optim.base_lr = 2e-3 * 256 / c.input.global_batch
        c.optim.warmup_steps = 30
        c.quantizer.temperature = (2.0, 0.5, 0.999)  # the reference's decay, 1000x faster for a few hundred steps
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
