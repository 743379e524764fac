"""ELECTRA pretraining from scratch (Clark et al., ICLR 2020): replaced-token detection by a discriminator against
a small masked-LM generator.

Arguments (comma separated after the file name):
  variant=small  the discriminator: 'small' (256 wide, 12 layers, 128-wide embeddings), 'base', 'large'
                 (jaxssl.models.electra.VARIANTS)
  corpus=lee     'lee' (gensim's bundled Lee news sentences, 2.6k), 'wiki' (its Wikipedia excerpt's prose
                 sentences, 18.8k) or a text file, one sentence per line
  runlocal       a short CPU run: a tiny discriminator (64 wide, 2 layers: the language models' runlocal size), a
                 generator half as wide, batch 32 rows of 48 tokens, 600 steps
Examples:
  --config=configs/electra.py
  --config=configs/electra.py:variant=base,corpus=/data/sentences.txt
  --config=configs/electra.py:runlocal
Recipes (google-research/electra configure_pretraining.py; the paper's appendix for base / large):
  small: generator 1/4 wide, lr 5e-4, batch 128 of 128 tokens, 1M steps; base: generator 1/3, lr 2e-4, batch 256 of
  512 tokens, 766k steps; large: generator 1/4, lr 2e-4, batch 2048 of 512 tokens, 400k steps, 25% masked.
  All: Adam (0.9, 0.999, eps 1e-6), weight decay 0.01 (not on LayerNorm / biases), 10k warmup steps then linear decay
  to 0, global-norm clip 1, dropout 0.1, loss = generator + 50 x discriminator. The tokenizer here is the MiniLM
  checkpoint's WordPiece vocabulary (30,522 ids, uncased: ELECTRA's own size).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg

# variant -> (generator width multiplier, learning rate, batch, max_len, steps, masked share)
RECIPES = {
    'small': (0.25, 5e-4, 128, 128, 1_000_000, 0.15),
    'base': (1 / 3, 2e-4, 256, 512, 766_000, 0.15),
    'large': (0.25, 2e-4, 2048, 512, 400_000, 0.25),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='small', corpus='lee', runlocal=False)
    if arg.variant not in RECIPES:
        raise ValueError(f"unknown ELECTRA variant '{arg.variant}'; valid: {', '.join(RECIPES)}")
    generator_size, lr, batch, max_len, steps, ratio = RECIPES[arg.variant]
    if arg.runlocal:
        generator_size, lr, batch, max_len, steps = 0.5, 1e-3, 32, 48, 600
    c = ml_collections.ConfigDict()
    c.method = 'electra'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'tiny' if arg.runlocal else arg.variant  # jaxssl.models.electra.VARIANTS
    # The generator's width (and heads) as a share of the discriminator's; the paper finds 1/4 to 1/2 best.
    c.model.generator_size = generator_size
    c.model.temperature = 1.0  # of the generator's softmax the replacements are sampled from
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.dtype = 'float32'  # 'bfloat16' on accelerators

    c.input = ml_collections.ConfigDict()
    c.input.corpus = arg.corpus
    c.input.tokenizer = 'minilm-l6'  # whose tokenizer.json (the models start from random weights)
    # > 0: only the ids the corpus uses at least this often (the rest -> [UNK]); 0: the whole vocabulary.
    c.input.vocab_min_count = 2 if arg.runlocal else 0
    c.input.global_batch = batch
    c.input.max_len = max_len
    c.input.pack = True  # rows of consecutive sentences, as ELECTRA's ExampleBuilder; False: one sentence a row

    c.masking = ml_collections.ConfigDict()
    c.masking.ratio = ratio
    c.masking.mask_prob = 0.85  # -> [MASK]; the rest keep their token (ELECTRA replaces none with random ids)
    c.masking.max_predictions = int((ratio + 0.005) * max_len)  # the reference's formula: 19 at 128, 7 at 48

    c.loss = ml_collections.ConfigDict()
    c.loss.gen_weight = 1.0
    c.loss.disc_weight = 50.0

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = 'linear'
    c.optim.base_lr = fixed_lr(c, lr)
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 0
    c.optim.warmup_steps = 60 if arg.runlocal else 10_000
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_grad = 1.0
    c.optim.no_decay = ('.*bias', '.*scale')  # the reference's "LayerNorm|layer_norm|bias" exclusion
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = steps
    c.eval.at_end = True
    c.eval.poolings = ('mean', 'cls')
    c.eval.max_len = 128  # the Lee documents are paragraphs (~80 words)
    c.eval.batch_size = 64
    c.eval.max_sentences = 0  # held-out sentences for duplicate retrieval; 0: all
    if arg.runlocal:
        c.train.log_every = 50
        c.checkpoint.every = 600
    return c
