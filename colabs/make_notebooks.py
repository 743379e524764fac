"""Writes the notebooks in colabs/ from the cells below: `python colabs/make_notebooks.py` (outputs stay empty).

Edit the cells here, not the .ipynb files; tests/test_colabs.py checks that the files match this script and
executes every notebook on CPU with JAXSSL_COLAB_TINY=1.
"""

from __future__ import annotations

import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
# Where Colab clones the code from (configs/ are files, so the notebooks need the repository, not only the package).
REPO = 'https://github.com/jaxssl/jaxssl'


def badge(name: str) -> str:
    url = f'https://colab.research.google.com/github/{REPO.removeprefix("https://github.com/")}/blob/main/colabs/{name}'
    return f'[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})'


SETUP = f"""# @title Install jaxssl (skipped when it is importable, e.g. in a checkout)
import importlib.util
import os
import subprocess
import sys

JAXSSL_REPO = '{REPO}'  # @param {{type:"string"}}
TINY = os.environ.get('JAXSSL_COLAB_TINY') == '1'  # CI: the smallest settings that still run every cell


def find_checkout(path='.'):
    \"\"\"The jaxssl checkout at or above `path` (the folder holding configs/videomae_v2.py), or None.\"\"\"
    path = os.path.abspath(path)
    while not os.path.isfile(os.path.join(path, 'configs', 'videomae_v2.py')):
        if os.path.dirname(path) == path:
            return None
        path = os.path.dirname(path)
    return path


ROOT = find_checkout()
if ROOT is None or importlib.util.find_spec('jaxssl') is None:
    ROOT = ROOT or os.path.abspath('jaxssl')
    if not os.path.isdir(ROOT):
        subprocess.run(['git', 'clone', '--depth', '1', JAXSSL_REPO, ROOT], check=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', ROOT + '[video]'], check=True)
    sys.path.insert(0, ROOT)  # this kernel started before the install; new processes see it anyway
os.chdir(ROOT)  # configs/ are read from the checkout
print('jaxssl at', ROOT)"""

SIZING = """# @title Detect the accelerator and size the run
import jax

PLATFORM, DEVICES = jax.devices()[0].platform, jax.device_count()
if TINY:  # a few steps on the 48-clip set: checks that every cell runs, learns nothing
    SIZE = dict(steps=20, batch=8, data='tiny', finetune_steps=20)
elif PLATFORM == 'cpu':  # runlocal as it is: about a minute per training run
    SIZE = dict(steps=0, batch=32, data='small', finetune_steps=0)
else:  # GPU / TPU: more steps and a bigger batch (8 clips per device at least)
    SIZE = dict(steps=1500, batch=max(64, 8 * DEVICES), data='small', finetune_steps=600)
RUNS = os.environ.get('JAXSSL_COLAB_WORKDIR', os.path.join(ROOT, 'runs', 'colab'))  # or gs://bucket/path
PRETRAIN_DIR = os.path.join(RUNS, 'pretrain') if '://' not in RUNS else RUNS + '/pretrain'


def pretrain_overrides():
    \"\"\"configs/videomae_v2.py:runlocal sized for this machine (train.steps=0: the config's 3 epochs).\"\"\"
    overrides = [f'train.steps={SIZE["steps"]}', f'input.global_batch={SIZE["batch"]}',
                 f'input.moving_digits_size={SIZE["data"]}']
    if TINY:
        overrides.append('eval.at_end=false')  # the frozen-feature probes take longer than the tiny run
    return overrides


print(f'{DEVICES} {PLATFORM} device(s): {SIZE}; runs in {RUNS}')"""

QUICKSTART = [
    (
        'md',
        f"""# jaxssl quickstart: pretrain VideoMAE V2

{badge('quickstart.ipynb')}

Pretrains a tiny VideoMAE V2 on the built-in *moving digits* videos (generated on first use), plots the loss and
shows what the model reconstructs behind the mask. The same run from a shell is
`python -m jaxssl.main --config=configs/videomae_v2.py:runlocal`. On a GPU or TPU runtime
(*Runtime > Change runtime type*) the cells size themselves up.""",
    ),
    ('code', SETUP),
    ('code', SIZING),
    (
        'md',
        """## Pretrain

`train.train` is the one trainer `python -m jaxssl.main` runs. The workdir receives checkpoints, `config.json`,
`metrics.jsonl`, TensorBoard events and `summary.json`; running the cell again resumes from the last checkpoint
(and does nothing when the run is complete). Interrupting the cell saves a checkpoint.""",
    ),
    (
        'code',
        """from jaxssl import train
from jaxssl.config import load_config

config = load_config('configs/videomae_v2.py:runlocal', pretrain_overrides())
summary, state = train.train(config, PRETRAIN_DIR)
print({k: v for k, v in summary.items() if k.startswith('final_')})""",
    ),
    ('md', '## The loss, from `metrics.jsonl`'),
    (
        'code',
        """import json

import matplotlib.pyplot as plt
from etils import epath

rows = [json.loads(line) for line in epath.Path(PRETRAIN_DIR, 'metrics.jsonl').read_text().splitlines()]
rows = [row for row in rows if 'loss' in row]  # evaluation rows carry eval/... keys only
plt.figure(figsize=(6, 3))
plt.plot([row['step'] for row in rows], [row['loss'] for row in rows], marker='.')
plt.xlabel('step')
plt.ylabel('normalised-pixel MSE')
plt.title('VideoMAE V2 pretraining loss')
plt.show()""",
    ),
    (
        'md',
        """## Reconstructions

For two validation clips, rows are: the input, what the encoder sees (90% of the tubes hidden), the
reconstruction, and the tubes the loss compares against; frames run left to right. The model predicts each hidden
tube in normalised pixels (per tube and channel), so the reconstruction is shown with the true tube's mean and std:
it shows the structure the model predicted, at the true brightness. Tubes that are neither visible nor
reconstructed (the decoder's running-cell mask) are grey. After a few CPU steps expect blurry blobs where the
digits are; a longer run on a GPU/TPU sharpens them.""",
    ),
    (
        'code',
        """from jaxssl.methods import videomae

method = videomae.Method(config)
pictures = method.visualize(state['params'], state['extra'])
plt.figure(figsize=(12, 6))
plt.imshow(pictures['reconstruction'])
plt.axis('off')
plt.show()""",
    ),
    (
        'md',
        """Next: [finetune.ipynb](finetune.ipynb) fine-tunes this checkpoint into a classifier. TensorBoard:
`%load_ext tensorboard` then `%tensorboard --logdir runs/colab/pretrain/tensorboard`.""",
    ),
]

FINETUNE = [
    (
        'md',
        f"""# Fine-tune a pretrained VideoMAE V2 and look at its predictions

{badge('finetune.ipynb')}

Starts from the quickstart's pretraining run (or makes one, if it is not there), fine-tunes the encoder into a
digit classifier with the reference's fine-tuning recipe (`configs/videomae_v2_finetune.py`: RandAugment, Mixup /
CutMix, layer-wise lr decay, multi-view testing) and shows predictions on validation clips. With the tiny CI
settings the numbers mean nothing; on a GPU/TPU runtime the run is long enough to learn.""",
    ),
    ('code', SETUP),
    ('code', SIZING),
    (
        'code',
        """# @title The pretrained run: the quickstart's, or a new one with the same settings
from jaxssl import train
from jaxssl.config import load_config

pretrain_config = load_config('configs/videomae_v2.py:runlocal', pretrain_overrides())
pretrain_summary, _ = train.train(pretrain_config, PRETRAIN_DIR)  # resumes; nothing to do if it is complete
print({k: round(v, 3) for k, v in pretrain_summary.items() if k.startswith('final_eval/')} or 'no probes run')""",
    ),
    (
        'md',
        """## Fine-tune

`init_from` takes a pretraining workdir (its latest checkpoint) or a params directory from
`python -m jaxssl.convert`; the encoder is loaded and the classification head starts fresh.""",
    ),
    (
        'code',
        """FINETUNE_DIR = PRETRAIN_DIR + '_finetune'
overrides = [f'init_from={PRETRAIN_DIR}', f'train.steps={SIZE["finetune_steps"]}',
             f'input.global_batch={SIZE["batch"]}', f'input.moving_digits_size={SIZE["data"]}']
config = load_config('configs/videomae_v2_finetune.py:runlocal', overrides)
summary, state = train.train(config, FINETUNE_DIR)
print(f"multi-view accuracy on the validation clips: top-1 {summary.get('final_eval/top1', float('nan')):.3f}, "
      f"top-5 {summary.get('final_eval/top5', float('nan')):.3f} (chance: 0.1 / 0.5)")""",
    ),
    ('md', '## Predictions on validation clips (softmax averaged over the test views, as in the evaluation)'),
    (
        'code',
        """import jax
import matplotlib.pyplot as plt
import numpy as np

from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import videomae_finetune

method = videomae_finetune.Method(config)
batch = next(iter(method.eval_dataset('val', 8, 8, 0, 1)))
clips, views = batch['video'].shape[:2]
logits, _ = jax.jit(method.logits)(state['params'], batch['video'].reshape(clips * views, *batch['video'].shape[2:]))
probs = np.asarray(jax.nn.softmax(logits.astype('float32'), axis=-1)).reshape(clips, views, -1).mean(axis=1)
labels = batch[config.input.label_key]
fig, axes = plt.subplots(1, clips, figsize=(2 * clips, 2.4))
for ax, video, p, label in zip(axes, batch['video'][:, 0], probs, labels):
    ax.imshow(np.clip(video[len(video) // 2] * IMAGENET_STD + IMAGENET_MEAN, 0, 1))
    ax.set_title(f'pred {p.argmax()} ({p.max():.2f})\\ntrue {label}', color='green' if p.argmax() == label else 'red')
    ax.axis('off')
plt.show()""",
    ),
]

CONVERT = [
    (
        'md',
        f"""# Convert an official VideoMAE V2 checkpoint and classify a clip

{badge('convert.ipynb')}

`python -m jaxssl.convert` reads a PyTorch checkpoint of the reference (OpenGVLab/VideoMAEv2) or transformers
layout safely (no pickled code runs) and writes a jaxssl params directory. Put the path of a fine-tuned release
(e.g. `vit_b_k710_dl_from_giant.pth`, downloaded from the VideoMAE V2 model zoo into Colab or Drive) in
`CHECKPOINT`. Left empty, the notebook builds a tiny checkpoint in the reference layout with random weights, so
every step runs anywhere; its predictions are meaningless.""",
    ),
    ('code', SETUP),
    (
        'code',
        """# @title The checkpoint
CHECKPOINT = ''  # @param {type:"string"}
FRAMES = 16  # @param {type:"integer"}
IMAGE_SIZE = 224  # @param {type:"integer"}
CHECKPOINT = os.environ.get('JAXSSL_CHECKPOINT', CHECKPOINT)
WORK = os.environ.get('JAXSSL_COLAB_WORKDIR', os.path.join(ROOT, 'runs', 'colab'))
os.makedirs(WORK, exist_ok=True)""",
    ),
    (
        'code',
        """# @title No checkpoint given: a tiny one in the reference's layout, random weights
import jax
import numpy as np

from jaxssl.convert import io
from jaxssl.convert.videomae import to_torch_state_dict
from jaxssl.models.videomae import make_classifier

if not CHECKPOINT:
    FRAMES, IMAGE_SIZE = 8, 32
    tiny = make_classifier('micro', num_classes=10)
    params = tiny.init(jax.random.key(0), np.zeros((1, FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))['params']
    state_dict = to_torch_state_dict(params)  # reference keys: patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...
    print(len(state_dict), 'tensors, e.g.', {k: v.shape for k, v in list(state_dict.items())[:4]})
    try:
        import torch
    except ImportError:  # no PyTorch: the same weights as .safetensors
        CHECKPOINT = os.path.join(WORK, 'tiny_reference.safetensors')
        io.save_torch_safetensors(params, CHECKPOINT)
    else:  # what the reference's training script saves: {'module': state_dict}
        CHECKPOINT = os.path.join(WORK, 'tiny_reference.pth')
        torch.save({'module': {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}, CHECKPOINT)
print('checkpoint:', CHECKPOINT)""",
    ),
    ('md', '## Convert'),
    (
        'code',
        """import shutil

PARAMS_DIR = os.path.join(WORK, 'converted')
shutil.rmtree(PARAMS_DIR, ignore_errors=True)  # the converter never overwrites
command = [sys.executable, '-m', 'jaxssl.convert', CHECKPOINT, PARAMS_DIR,
           '--frames', str(FRAMES), '--image-size', str(IMAGE_SIZE)]
result = subprocess.run(command, capture_output=True, text=True)
print(result.stdout or result.stderr)
result.check_returncode()""",
    ),
    ('md', '## Load the params and classify a built-in clip'),
    (
        'code',
        """import matplotlib.pyplot as plt

from jaxssl import params_io
from jaxssl.data import decode, moving_digits
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.models.videomae import VideoMAEClassifier

params, metadata = params_io.load_params(PARAMS_DIR)
if metadata['kind'] != 'classifier':
    raise ValueError(f"{CHECKPOINT} holds a {metadata['kind']} model: classification needs a fine-tuned checkpoint")
model = VideoMAEClassifier(**metadata['model'])

clips = moving_digits.MovingDigitsSource(size='tiny', split='val')
record = clips[0]
frames = decode.read_video_frames(record['video'], lambda n: np.linspace(0, n - 1, FRAMES).round().astype(int))
video = (frames / 255.0 - IMAGENET_MEAN) / IMAGENET_STD  # ImageNet-normalised, channels last
video = jax.image.resize(video, (FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), 'bilinear')[None].astype(np.float32)
logits, _ = jax.jit(model.apply)({'params': params}, video)
probs = np.asarray(jax.nn.softmax(logits[0].astype(np.float32)))
top5 = probs.argsort()[::-1][:5]
print('top-5 classes:', ', '.join(f'{c} ({probs[c]:.3f})' for c in top5))
print('(random weights: meaningless)' if 'tiny_reference' in CHECKPOINT else '(class indices of the fine-tuning set)')
plt.figure(figsize=(10, 2))
plt.imshow(np.concatenate(list(frames[:: max(1, len(frames) // 8)]), axis=1))
plt.axis('off')
plt.title(f'a moving-digits clip of digit {record["label"]}: predicted class {top5[0]}')
plt.show()""",
    ),
]

NOTEBOOKS = {'quickstart.ipynb': QUICKSTART, 'finetune.ipynb': FINETUNE, 'convert.ipynb': CONVERT}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
        'language_info': {'name': 'python'},
        'colab': {'provenance': []},
        'accelerator': 'GPU',
    }
    make = {'md': nbformat.v4.new_markdown_cell, 'code': nbformat.v4.new_code_cell}
    notebook.cells = [make[kind](text) for kind, text in cells]
    for index, cell in enumerate(notebook.cells):
        cell.id = f'cell-{index}'  # stable ids: regenerating gives identical files
    return notebook


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name]), version=4) + '\n'


def main(out_dir: str = HERE) -> None:
    for name in NOTEBOOKS:
        with open(os.path.join(out_dir, name), 'w') as f:
            f.write(render(name))
        print('wrote', os.path.join(out_dir, name))


if __name__ == '__main__':
    main(*sys.argv[1:])
