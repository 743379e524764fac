"""Language-model pretraining from scratch: BERT's masked LM or GPT-1's causal LM (the survey of Yang et al., arXiv
2411.18021, compares the two).

Arguments (comma separated after the file name):
  objective=mlm  'mlm' (BERT: 15% of tokens, 80/10/10 [MASK] / random / kept, 'bert' head) or 'clm' (GPT-1:
                 causal attention, next-token prediction, 'gpt' head)
  corpus=lee     'lee' (gensim's bundled Lee news sentences, 2.6k), 'wiki' (its Wikipedia excerpt's prose
                 sentences, 18.8k) or a text file, one sentence per line
  runlocal       a short CPU run: a tiny model (64 wide, 2 layers), batch 32 rows of 48 tokens, 600 steps
Examples:
  --config=configs/language_model.py
  --config=configs/language_model.py:objective=clm,corpus=/data/sentences.txt
  --config=configs/language_model.py:runlocal
Recipes (shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md, section 4):
BERT-base: 12 layers, 768 wide, 12 heads; Adam (0.9, 0.999, eps 1e-6), lr 1e-4, weight decay 0.01, 10k warmup steps
then linear decay, batch 256 of 128 tokens (BERT's phase 1), 1M steps, 20 predictions a sequence, dropout 0.1.
GPT-1: the same size; Adam lr 2.5e-4, 2,000 warmup steps then cosine to 0, batch 64 of 512 tokens, 100 epochs,
weight decay 0.01 on the weights, dropout 0.1. Both here use the MiniLM checkpoint's WordPiece vocabulary (30,522 ids;
GPT-1 used a 40k BPE) and a steps budget instead of a corpus of books.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, objective='mlm', corpus='lee', runlocal=False)
    mlm = arg.objective == 'mlm'
    c = ml_collections.ConfigDict()
    c.method = 'language_model'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.objective = arg.objective
    c.model.head = 'bert' if mlm else 'gpt'  # the layout and head (jaxssl.models.language_model.HEADS)
    c.model.variant = 'tiny' if arg.runlocal else 'base'  # sizes: jaxssl.models.bert.VARIANTS
    c.model.dropout = 0.1  # embeddings, attention output, MLP output
    c.model.attention_dropout = 0.1  # on the attention probabilities
    c.model.dtype = 'float32'  # 'bfloat16' on accelerators

    c.input = ml_collections.ConfigDict()
    c.input.corpus = arg.corpus
    c.input.tokenizer = 'minilm-l6'  # whose tokenizer.json (the model itself starts from random weights)
    # > 0: only the tokenizer's ids the corpus uses at least this often (text.CorpusVocabulary; the rest -> [UNK]);
    # 0: its whole vocabulary. Runlocal keeps the Lee corpus's 4.5k ids seen twice: a 7x smaller softmax.
    c.input.vocab_min_count = 2 if arg.runlocal else 0
    c.input.global_batch = 32 if arg.runlocal else (256 if mlm else 64)
    c.input.max_len = 48 if arg.runlocal else (128 if mlm else 512)
    # Rows of consecutive sentences filling max_len ([CLS] + the token stream, each sentence ending with [SEP]), as
    # BERT's blocks and GPT-1's spans; False: one padded sentence a row.
    c.input.pack = True

    c.masking = ml_collections.ConfigDict()  # the masked LM's corruption (unused by clm)
    c.masking.ratio = 0.15
    c.masking.mask_prob = 0.8  # -> [MASK]
    c.masking.random_prob = 0.1  # -> a uniformly random id; the rest keep their token
    c.masking.max_predictions = 8 if arg.runlocal else 20  # round(0.15 x 48) = 7 fit; BERT's 20 at 128 tokens

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = 'linear' if mlm else 'cosine'
    c.optim.base_lr = fixed_lr(c, 1e-3 if arg.runlocal else (1e-4 if mlm else 2.5e-4))
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 0
    c.optim.warmup_steps = 60 if arg.runlocal else (10_000 if mlm else 2_000)
    c.optim.epochs = 100  # GPT-1's; BERT's 1M steps are train.steps
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-6 if mlm else 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_grad = 1.0 if mlm else 0.0  # BERT clips the global norm at 1
    c.optim.no_decay = ('.*bias', '.*scale')  # BERT's LayerNorm / bias exclusion, GPT-1's "non bias or gain weights"
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 1_000_000 if mlm else 0
    c.eval.at_end = True
    # 'last': GPT-1's classification token; a causal model's [CLS] state sees only itself (constant: no 'cls').
    c.eval.poolings = ('mean', 'last', 'cls') if mlm else ('mean', 'last')
    c.eval.max_len = 128  # the Lee documents are paragraphs (~80 words)
    c.eval.batch_size = 64
    c.eval.max_sentences = 0  # held-out sentences for duplicate retrieval; 0: all
    if arg.runlocal:
        c.train.steps = 600
        c.train.log_every = 50
        c.checkpoint.every = 600
    return c
