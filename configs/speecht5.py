"""SpeechT5 pre-training (Ao et al., ACL 2022): one encoder-decoder on unpaired speech (masked-unit prediction +
log-mel reconstruction) and text (BART denoising of characters), tied by a shared quantizer.

Arguments (comma separated after the file name):
  variant=base     t5_transformer_base (12 + 6 x 768, post-norm, relative keys); micro, tiny (CPU: runlocal, tests)
  runlocal         a micro model on the built-in synthetic words (speech) and the Lee sentences (text), for a CPU
Examples:
  --config=configs/speecht5.py --config.input.data_root=/data/librispeech_wav --config.text.corpus=/data/lm.txt
  --config=configs/speecht5.py:runlocal
Reference recipe: microsoft/SpeechT5 README's pre-training command (t5_transformer_base, 32 GPUs x update_freq 2,
max_tokens 1.4M samples, batch_ratio [1, 0.0086], lr 2e-4, 64k warmup, 800k updates); fact sheet in docs/methods.md.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'speecht5'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.activation_dropout = 0.0
    c.model.layerdrop = 0.05  # encoder and decoder blocks
    c.model.feature_grad_mult = 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.prob = 0.8  # span starts per frame before overlaps (about 56% of frames end up masked)
    c.mask.length = 10  # frames (200 ms)
    c.mask.min_spans = 2

    c.teacher = ml_collections.ConfigDict()
    # The masked-prediction labels: HuBERT's first-iteration units, the nearest of `clusters` k-means centroids of
    # 39-dim MFCC features (the reference reads iteration-2 HuBERT units, 500 classes, from files).
    c.teacher.clusters = 100
    c.teacher.fit_clips = 200 if arg.runlocal else 2000  # clips whose MFCC frames the k-means is fitted on
    c.teacher.centroids = ''  # a (clusters, 39) .npy to use instead of fitting

    c.quantizer = ml_collections.ConfigDict()
    c.quantizer.temperature = (2.0, 0.5, 0.999995)  # (start, floor, decay per update)
    c.quantizer.share = 0.1  # --codebook-prob: the encoder's time steps replaced by codevectors

    c.text = ml_collections.ConfigDict()
    c.text.corpus = 'lee'  # 'lee', 'wiki' or a text file of one sentence per line (LibriSpeech-LM in the reference)
    c.text.max_len = 160 if arg.runlocal else 600  # tokens with <s> and </s>: max_text_positions; longer are dropped
    # Sentences per utterance in each step. The reference's text batches hold 12,040 tokens against ~7 utterances of
    # ~12 s in its speech batches: ~1,700 characters per utterance, about 8 sentences of LibriSpeech-LM.
    c.text.rows_per_utterance = 2 if arg.runlocal else 8
    c.text.min_char_count = 2  # characters rarer than this in the corpus become <unk>
    c.text.mask_ratio = 0.3
    c.text.poisson_lambda = 3.5
    c.text.random_ratio = 0.1  # masked spans given a random symbol instead of <mask>

    c.loss = ml_collections.ConfigDict()
    c.loss.feature_penalty_weight = 10.0  # --loss-weights [10, 0.1]
    c.loss.diversity_weight = 0.1
    c.loss.reconstruction_weight = 1.0  # dec_weight: the speech decoder's L1 + stop BCE
    c.loss.text_share = 0.5  # the text loss's weight in each step (the reference: as many text as speech batches)
    c.loss.reference_batches = 0  # groups for the per-GPU crops and masks; 0: one per device

    add_audio_input_config(c, runlocal=arg.runlocal, features='waveform')
    c.input.max_samples = 16000 if arg.runlocal else 250_000  # max_speech_sample_size
    c.input.min_samples = 0 if arg.runlocal else 32_000  # shorter files are skipped (2 s)
    c.input.bucket_by_length = not arg.runlocal
    c.input.global_batch = 16 if arg.runlocal else 256  # utterances; ~230 a reference update (32 speech batches)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # fairseq's adam: decoupled weight decay on every parameter
    c.optim.schedule = 'linear'  # polynomial_decay (power 1): linear warmup, then linear decay to 0
    c.optim.base_lr = 2e-4  # lr = base_lr x global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 64_000
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.decay_vectors = True  # biases, norms, embeddings and the codebook decay too, as fairseq's adam
    c.optim.clip_grad = 5.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 800_000
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    c.eval.pictures = 4  # clips whose log-mel and its reconstructions are drawn at each evaluation
    if arg.runlocal:
        c.optim.base_lr = 2e-3 * 256 / c.input.global_batch
        c.optim.warmup_steps = 30
        c.quantizer.temperature = (2.0, 0.5, 0.995)  # the reference's decay, 1000x faster for a few hundred steps
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
