"""CLIP: the model against transformers' CLIPModel with converted weights (and as the starting point of a run), the
symmetric loss against numpy and sharded against one device, the logit-scale clamp, tokenisation as open_clip's,
the built-in captions and the CSV source's skip-and-count policy, zero-shot classification, config errors naming
the key, and a 2-step runlocal run on one and on 8 devices."""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from sharded_runs import assert_sharded_matches_one_device

from jaxssl import optim, sharding
from jaxssl.config import ConfigError, load_config
from jaxssl.data import captions, pipeline
from jaxssl.data import images as image_data
from jaxssl.losses import contrastive
from jaxssl.methods import clip as clip_method
from jaxssl.models import clip, clip_weights

CONFIG = 'configs/clip.py:runlocal'
EOT = 99
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, eos_token_id=EOT)  # fmt: skip
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, image_size=32,
              patch_size=8)  # fmt: skip


@pytest.fixture(scope='module', params=[('quick_gelu', EOT), ('gelu', 2)])
def saved(request, tmp_path_factory):
    """A random transformers CLIPModel saved with save_pretrained: (folder, torch model). eos_token_id 2 is the legacy
    value of the hub's OpenAI configs, for which transformers pools at the largest token id (the end of text)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    act, eos = request.param
    config = CLIPConfig(
        text_config={**TEXT, 'hidden_act': act, 'eos_token_id': eos},
        vision_config={**VISION, 'hidden_act': act},
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    directory = str(tmp_path_factory.mktemp(f'{act}_{eos}'))
    model.save_pretrained(directory)
    return directory, model


def test_embeddings_and_logits_match_transformers(saved):
    directory, reference = saved
    fields, params = clip_weights.load(directory)
    assert fields.pop('image_size') == 32 and fields['eot_id'] == EOT
    model = clip.CLIP(**fields)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, EOT - 1, size=(3, 16))
    tokens[0, 5] = tokens[1, 15] = tokens[2, 3] = tokens[2, 9] = EOT  # row 2: the first end-of-text is pooled
    with torch.no_grad():
        want = reference(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(images).permute(0, 3, 1, 2))
    image, text, logit_scale = model.apply({'params': params}, images, tokens)
    unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=1, keepdims=True)
    np.testing.assert_allclose(unit(image), want.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(unit(text), want.text_embeds.numpy(), atol=1e-5)
    logits = np.exp(float(logit_scale)) * unit(image) @ unit(text).T
    np.testing.assert_allclose(logits, want.logits_per_image.numpy(), atol=1e-4)
    # Every parameter the model initialises is filled, with its shape.
    init = model.init(jax.random.key(0), images, tokens)['params']
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)


def test_pretrained_folder_is_the_starting_point(saved, tmp_path):
    directory, _ = saved
    tokenizer = captions.word_tokenizer(['a', 'b'])  # 6 tokens, end of text 5: the model's is 99
    tokenizer._tok.save(str(tmp_path / 'tokenizer.json'))
    overrides = [f'model.pretrained={directory}', f'text.tokenizer={tmp_path}']
    with pytest.raises(ConfigError, match=r'text\.tokenizer'):
        clip_method.Method(load_config(CONFIG, overrides))
    with pytest.raises(ConfigError, match=r'input\.image_size'):
        clip_method.Method(load_config(CONFIG, ['model.pretrained=' + directory, 'input.image_size=64']))
    with pytest.raises(ConfigError, match=r'text\.tokenizer'):  # the built-in words do not fit the released model
        clip_method.Method(load_config(CONFIG, [f'model.pretrained={directory}']))
    fitting = captions.word_tokenizer([f'w{i:02d}' for i in range(96)])  # 100 tokens, end of text 99
    fitting._tok.save(str(tmp_path / 'tokenizer.json'))
    method = clip_method.Method(load_config(CONFIG, overrides))
    assert method.model.text_width == 64 and method.model.patch == 8  # sizes from config.json
    params, _ = method.init(jax.random.key(0), method.example_batch(2))
    _, released = clip_weights.load(directory)
    jax.tree.map(np.testing.assert_array_equal, params, released)


def reference_loss(image, text, logit_scale):
    """openai/CLIP's pseudocode in numpy: symmetric cross entropy over the scaled cosine matrix."""
    i = image / np.linalg.norm(image, axis=1, keepdims=True)
    t = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.exp(logit_scale) * i @ t.T
    ce = lambda z: np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))
    return (ce(logits) + ce(logits.T)) / 2


def test_loss_known_answer_and_accuracies():
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss, metrics = contrastive.clip_loss(jnp.asarray(image), jnp.asarray(text), jnp.asarray(1.3))
    assert float(loss) == pytest.approx(reference_loss(image, text, 1.3), rel=1e-5)
    # Identical pairs at a large scale: the loss vanishes and both directions are always right.
    loss, metrics = contrastive.clip_loss(jnp.asarray(image), jnp.asarray(image), jnp.asarray(4.6))
    assert float(metrics['image_to_text_acc']) == float(metrics['text_to_image_acc']) == 1.0
    assert float(loss) < 1e-3
    # Symmetric in the two towers; at logit scale 0 with equal embeddings everywhere it is exactly log N.
    swapped, _ = contrastive.clip_loss(jnp.asarray(text), jnp.asarray(image), jnp.asarray(1.3))
    assert float(swapped) == pytest.approx(reference_loss(image, text, 1.3), rel=1e-5)
    same = jnp.ones((6, 5))
    assert float(contrastive.clip_loss(same, same, jnp.asarray(0.0))[0]) == pytest.approx(np.log(6), rel=1e-6)


def test_global_loss_and_gradients_equal_one_device():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), sharding.BATCH_AXES)  # both batch axes
    rng = np.random.default_rng(1)
    image, text = jnp.asarray(rng.normal(size=(16, 8))), jnp.asarray(rng.normal(size=(16, 8)))
    scale = jnp.asarray(2.0)
    one = lambda i, t, s: contrastive.clip_loss(i, t, s)[0]
    many = jax.jit(lambda i, t, s: contrastive.global_clip_loss(i, t, s, mesh, sharding.BATCH_AXES)[0])
    np.testing.assert_allclose(many(image, text, scale), one(image, text, scale), rtol=1e-5)
    want = jax.grad(one, argnums=(0, 1, 2))(image, text, scale)
    got = jax.jit(jax.grad(many, argnums=(0, 1, 2)))(image, text, scale)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)


def test_logit_scale_is_clamped_after_the_step_and_can_come_back():
    config = load_config(CONFIG)
    params = {'logit_scale': jnp.asarray(4.6), 'layer': {'kernel': jnp.ones((2, 2))}}
    tx = optim.make_optimizer(config, params, lambda step: 1.0)
    state = tx.init(params)
    up = {'logit_scale': jnp.asarray(-1.0), 'layer': {'kernel': jnp.zeros((2, 2))}}  # a step that raises it
    updates, state = tx.update(up, state, params)
    params = optax.apply_updates(params, updates)
    assert float(params['logit_scale']) == pytest.approx(np.log(100.0), rel=1e-6)
    down = {'logit_scale': jnp.asarray(1.0), 'layer': {'kernel': jnp.zeros((2, 2))}}
    for _ in range(3):  # at the bound the gradient still acts (a clamp in the loss would have zeroed it)
        updates, state = tx.update(down, state, params)
        params = optax.apply_updates(params, updates)
    assert float(params['logit_scale']) < np.log(100.0) - 1e-3


# --- tokens and captions ---------------------------------------------------------------------------------------------
def test_tokens_as_open_clip_start_end_truncation_padding(tmp_path):
    tokenizer = captions.word_tokenizer(['a', 'photo', 'of', 'the', 'number', 'seven', '.'])
    ids = {w: tokenizer._tok.token_to_id(w) for w in ('a', 'photo', 'of', 'the', 'number', 'seven', '.')}
    sot, eot = tokenizer.sot_id, tokenizer.eot_id
    assert eot == tokenizer.vocab_size - 1  # end of text has the largest id, as CLIP's
    rows = tokenizer(['A  photo of the NUMBER seven.', 'a photo of the number seven .'], 10)
    want = [sot, ids['a'], ids['photo'], ids['of'], ids['the'], ids['number'], ids['seven'], ids['.'], eot, 0]
    np.testing.assert_array_equal(rows, [want, want])  # lower-cased, whitespace collapsed, padded with 0
    short = tokenizer(['a photo of the number seven.'], 5)
    np.testing.assert_array_equal(short[0], [sot, ids['a'], ids['photo'], ids['of'], eot])  # end of text kept last
    assert tokenizer(['a zebra'], 4)[0, 2] == tokenizer._tok.token_to_id('<unk>')
    # A tokenizer.json (or a folder with one) reads back the same; a copy for Grain workers too.
    tokenizer._tok.save(str(tmp_path / 'tokenizer.json'))
    for path in (tmp_path, tmp_path / 'tokenizer.json'):
        read = captions.CaptionTokenizer.from_file(str(path))
        np.testing.assert_array_equal(read(['a photo of seven'], 6), tokenizer(['a photo of seven'], 6))
    import pickle

    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokenizer))(['seven'], 4), tokenizer(['seven'], 4))
    with pytest.raises(ValueError, match='startoftext'):
        from tokenizers import Tokenizer, models

        captions.CaptionTokenizer(Tokenizer(models.WordLevel({'a': 0, '<unk>': 1}, unk_token='<unk>')))


def byte_symbols() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    others for characters from 256 up, in byte order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def open_clip_ids(text, vocab, merges, context_length):
    """open_clip's SimpleTokenizer + tokenize(), transcribed from its algorithm: whitespace collapsed and lower case,
    its regex pieces, bytes as characters, the last with '</w>', lowest-ranked adjacent pair merged until none is left;
    start, ids, end, truncated with end last, zero padded."""
    import regex

    symbols, ranks = byte_symbols(), {pair: i for i, pair in enumerate(merges)}
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = []
    for piece in regex.findall(pattern, ' '.join(text.split()).lower(), regex.IGNORECASE):
        chars = [symbols[b] for b in piece.encode('utf-8')]
        word = [*chars[:-1], chars[-1] + '</w>']
        while len(word) > 1:
            pair = min(itertools.pairwise(word), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    row = [*[vocab[captions.START], *ids][: context_length - 1], vocab[captions.END]]
    return row + [0] * (context_length - len(row))


def test_clip_bpe_tokenizer_json_equals_open_clip(tmp_path):
    """A CLIP BPE tokenizer.json as transformers writes it (normaliser, pre-tokeniser, '</w>' suffix, its own
    post-processor left out) gives open_clip's ids: the production path for captions from a CSV."""
    from transformers import CLIPTokenizer

    chars = list(byte_symbols().values())
    merges = [('t', 'h'), ('th', 'e</w>'), ('p', 'h'), ('ph', 'o'), ('t', 'o</w>'), ('pho', 'to</w>'), ('c', 'a'),
              ('ca', 't</w>'), ("'", 's</w>'), ('i', 't</w>')]  # fmt: skip
    vocab = [*chars, *(c + '</w>' for c in chars), *(a + b for a, b in merges), captions.START, captions.END]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(str(tmp_path))
    tokenizer = captions.CaptionTokenizer.from_file(str(tmp_path))
    assert (tokenizer.sot_id, tokenizer.eot_id) == (vocab[captions.START], vocab[captions.END])
    texts = ['A photo of  the CAT!', "it's   a photo.", 'digit 42, café', 'the the the the the the the the the']
    for length in (8, 16):
        want = [open_clip_ids(t, vocab, merges, length) for t in texts]
        np.testing.assert_array_equal(tokenizer(texts, length), want)
    assert {vocab['photo</w>'], vocab['the</w>'], vocab['cat</w>']} <= set(want[0])  # the merges did happen


def test_digit_attributes_and_captions():
    # A bar whose top leans right, and its mirror image.
    image = np.zeros((1, 28, 28), np.uint8)
    for row in range(4, 24):
        image[0, row, 18 - row // 2 : 21 - row // 2] = 255
    ink, slant = captions.digit_attributes(image)
    _, mirrored = captions.digit_attributes(image[:, :, ::-1])
    assert slant[0] > 0.3 and mirrored[0] == pytest.approx(-slant[0])
    assert ink[0] == pytest.approx(60 / 784)
    source = captions.DigitCaptionSource('val')
    vocabulary = set(captions.digit_vocabulary())
    weights = []
    for i in range(len(source)):
        record = source[i]
        label, texts = record['label'], record['captions']
        assert len(texts) == len(captions.DIGIT_TEMPLATES)
        assert all(captions.DIGIT_WORDS[label] in t or str(label) in t for t in texts)
        weights.append(next(w for w in captions.WEIGHTS if f'a {w} {captions.DIGIT_WORDS[label]}.' in texts))
    assert all(piece in vocabulary for t in texts for piece in t.replace(',', ' , ').replace('.', ' .').split())
    shares = [weights.count(w) / len(weights) for w in captions.WEIGHTS]
    assert min(shares) > 0.25 and max(shares) < 0.42  # tertiles of all 5,000 digits: about a third each here


def test_csv_rows_without_captions_are_counted_and_missing_images_skipped(tmp_path):
    from PIL import Image

    for name in ('a.png', 'b.png'):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / name)
    lines = ['filepath\ttitle', 'a.png\ta grey square', 'gone.png\ta lost picture', 'b.png\t', '\tno image', 'b.png\tb']
    (tmp_path / 'pairs.tsv').write_text('\n'.join(lines) + '\n')
    source = captions.CaptionCsvSource(str(tmp_path / 'pairs.tsv'))
    assert len(source) == 3 and source.skipped_rows == 2
    assert source[0]['image'] == os.path.join(str(tmp_path), 'a.png') and source[2]['captions'] == ['b']
    tokenizer = captions.word_tokenizer(['a', 'grey', 'square', 'b'])
    view = captions.PairView(lambda image, rng: image_data.normalize(image), tokenizer, 6)
    loader = image_data.ImageLoader(source, range(3), view, decode=captions.decode_pair)
    out = loader(1, np.random.default_rng(0))  # the missing image is replaced by a readable one and counted
    assert int(out[pipeline.SKIPPED_KEY]) == 1 and out['image'].shape == (1, 8, 8, 3) and out['tokens'].shape == (1, 6)
    with pytest.raises(ValueError, match='no column'):
        (tmp_path / 'bad.tsv').write_text('path\tcaption\na.png\tx\n')
        captions.CaptionCsvSource(str(tmp_path / 'bad.tsv'))


def test_zero_shot_classifier_and_accuracy():
    config = load_config(CONFIG, ['model.variant=micro'])
    method = clip_method.Method(config)
    params, _ = method.init(jax.random.key(0), method.example_batch(2))
    names = ['three', 'seven']
    classifier = method.zero_shot_classifier(params, names)
    templates = config.eval.zero_shot_templates
    tokens = method.tokenizer([t.format(n) for n in names for t in templates], config.text.context_length)
    text = np.asarray(method.model.apply({'params': params}, tokens, method=method.model.encode_text), np.float64)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    mean = text.reshape(2, len(templates), -1).mean(axis=1)
    np.testing.assert_allclose(classifier, mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    embeddings = np.asarray([[1.0, 0.1], [0.2, 1.0], [3.0, 0.0], [0.0, -1.0]])
    accuracy = clip_method.zero_shot_accuracy(embeddings, np.asarray([0, 1, 1, 0]), np.asarray([1, 1, 1, 0]), np.eye(2))
    assert accuracy == pytest.approx(2 / 3)  # the invalid fourth row does not count


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r'model\.variant'):
        load_config(CONFIG, ['model.variant=huge'])
    with pytest.raises(ConfigError, match=r'input\.image_size'):
        load_config(CONFIG, ['input.image_size=30'])
    with pytest.raises(ConfigError, match=r'input\.dataset'):
        load_config(CONFIG, ['input.dataset=folder'])
    with pytest.raises(ConfigError, match=r'zero_shot_templates'):
        load_config(CONFIG, ["eval.zero_shot_templates=('a photo',)"])
    with pytest.raises(ConfigError, match=r'input\.captions_csv'):
        clip_method.Method(load_config('configs/clip.py'))
    with pytest.raises(ConfigError, match=r'text\.tokenizer'):
        clip_method.Method(load_config('configs/clip.py', [f'input.captions_csv={tmp_path}/x.tsv']))
    with pytest.raises(ConfigError, match=r'text\.tokenizer'):
        clip_method.Method(load_config(CONFIG, [f'text.tokenizer={tmp_path}']))
    with pytest.raises(ConfigError, match=r'train\.grad_accum'):
        load_config(CONFIG, ['train.grad_accum=2'])
    with pytest.raises(ConfigError, match=r'eval\.class_names'):
        clip_method.Method(load_config(CONFIG, ["eval.class_names=('a', 'b')"])).class_names()
    for variant in ('B/32', 'B/16', 'L/14'):
        assert load_config(f'configs/clip.py:variant={variant}').optim.clamp[0][2] == pytest.approx(np.log(100))


def test_runlocal_sharded_matches_one_device_with_probes_and_zero_shot(tmp_path):
    summary, rows = assert_sharded_matches_one_device(
        CONFIG, tmp_path, 'model.variant=micro', 'input.global_batch=16', 'text.context_length=12'
    )
    assert 0.0 <= summary['final_eval/label/zero_shot'] <= 1.0
    assert 0.0 <= summary['final_eval/label/embed/knn'] <= 1.0
    assert rows[0]['logit_scale'] == pytest.approx(1 / 0.07, rel=1e-4)
    assert rows[0]['loss'] == pytest.approx(np.log(16), rel=0.2)
