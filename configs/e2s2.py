"""E2S2 pretraining (Zhong et al., arXiv 2205.14912): a BART encoder-decoder denoising its input, with a noise
detection head and a contrastive loss on the encoder.

Arguments (comma separated after the file name):
  variant=large  'large' (12 + 12 layers, 1,024 wide, the paper's), 'base' (6 + 6, 768), 'tiny'
                 (jaxssl.models.bart.VARIANTS)
  corpus=lee     'lee' (gensim's bundled Lee news sentences, 2.6k), 'wiki' (its Wikipedia excerpt's prose
                 sentences, 18.8k) or a text file, one sentence per line
  runlocal       a short CPU run: a tiny BART (64 wide, 2 + 2 layers), batch 32 rows of 48 tokens, 600 steps
Examples:
  --config=configs/e2s2.py:corpus=/data/sentences.txt --config.model.pretrained=/models/bart-large
      --config.input.tokenizer=/models/bart-large --config.input.vocab_min_count=0   (the paper's set-up)
  --config=configs/e2s2.py
  --config=configs/e2s2.py:variant=base,corpus=/data/sentences.txt
  --config=configs/e2s2.py:runlocal
  BART alone (text infilling, the ablation's baseline):
  --config=configs/e2s2.py:runlocal --config.noise.shuffle=false --config.noise.replace_ratio=0.0
      --config.loss.detection_weight=0.0 --config.loss.contrastive=false
Objective: the paper's (the reference's --cse); --config.loss.contrastive=false is what the repository's train.sh
runs. Recipe (train.sh, a continued pretraining of bart.large: here from scratch, the released BART is not
offline): rows of up to 1,024 tokens, 4 rows (4,096 tokens) per GPU x update-freq 3 (the GPU count is not given: 8
assumed, 96 rows); Adam (0.9, 0.98, eps 1e-6), decoupled weight decay 0.01 on every parameter, no clipping, lr
1.5e-6 (as written: unusually small, perhaps a typo), 6k warmup steps then linear decay to 0 at 50k; dropout 0.1,
attention dropout 0.1. The tokenizer here is the MiniLM checkpoint's WordPiece vocabulary (BART's is GPT-2's BPE).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='large', corpus='lee', runlocal=False)
    c = ml_collections.ConfigDict()
    c.method = 'e2s2'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'tiny' if arg.runlocal else arg.variant  # jaxssl.models.bart.VARIANTS
    # A transformers BART folder (config.json, model.safetensors; e.g. facebook/bart-large) to continue pretraining,
    # as the paper: its sizes replace the variant's; set input.tokenizer to the same folder (its tokenizer.json) and
    # input.vocab_min_count=0. '': from scratch.
    c.model.pretrained = ''
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.activation_dropout = 0.0
    c.model.dtype = 'float32'  # 'bfloat16' on accelerators

    c.input = ml_collections.ConfigDict()
    c.input.corpus = arg.corpus
    c.input.tokenizer = 'minilm-l6'  # whose tokenizer.json (the model starts from random weights)
    # > 0: only the ids the corpus uses at least this often (the rest -> [UNK]); 0: the whole vocabulary.
    c.input.vocab_min_count = 2 if arg.runlocal else 0
    c.input.global_batch = 32 if arg.runlocal else 96
    c.input.max_len = 48 if arg.runlocal else 1024  # [CLS], consecutive sentences, [SEP]

    c.noise = ml_collections.ConfigDict()  # jaxssl.data.text_noise
    c.noise.mask_ratio = 0.15  # of the row's tokens, in Poisson spans, each span -> one [MASK]
    c.noise.poisson_lambda = 3.0
    c.noise.shuffle = True  # permuted 3-token windows (label 1)
    c.noise.replace_ratio = 0.15  # random ids (label 2); the reference hard-codes 0.15 whatever --e2s2-random says

    c.loss = ml_collections.ConfigDict()
    # True: the paper's objective (the reference's --cse): 0.5 x NLL + 0.5 x NLL(mask-only) + contrastive_weight x
    # NT-Xent + detection_weight x detection; False: NLL + detection_weight x detection (the repository's train.sh).
    c.loss.contrastive = True
    c.loss.contrastive_weight = 0.05
    c.loss.detection_weight = 0.05
    c.loss.temperature = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = 'linear'
    c.optim.base_lr = fixed_lr(c, 1e-3 if arg.runlocal else 1.5e-6)
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 0
    c.optim.warmup_steps = 60 if arg.runlocal else 6000
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.decay_vectors = True  # fairseq's Adam decays every parameter, the biases and LayerNorms too
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 600 if arg.runlocal else 50_000
    c.eval.at_end = True
    c.eval.poolings = ('mean', 'cls')
    c.eval.max_len = 128  # the Lee documents are paragraphs (~80 words)
    c.eval.batch_size = 64
    c.eval.max_sentences = 0  # held-out sentences for duplicate retrieval; 0: all
    if arg.runlocal:
        c.train.log_every = 50
        c.checkpoint.every = 600
    return c
