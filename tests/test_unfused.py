"""UNFUSED: the student and its loss against a torch transcription of the reference (Sreyan88/LAPE
src/encoder/audiontt.py AudioNTT2020Task6, src/upstream/unfused/upstream_expert.py Project / Classifier /
training_step, src/utils/utils.py loss_fn_mse), the pseudo-label clustering steps, config errors, and a sharded run
on the trainer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sharded_runs import assert_sharded_matches_one_device

from jaxssl import pseudo_labels
from jaxssl.config import ConfigError, load_config
from jaxssl.losses import self_distillation
from jaxssl.methods import unfused
from jaxssl.models import audio_ntt

MELS, FRAMES, CHANNELS, WIDTH, CLASSES, BATCH = 16, 24, 8, 32, 5, 6


class TorchStudent(torch.nn.Module):
    """The reference's student and heads at small sizes, transcribed from the code's layer list (dropout 0)."""

    def __init__(self):
        super().__init__()
        block = lambda cin: torch.nn.Sequential(
            torch.nn.Conv2d(cin, CHANNELS, 3, padding=1),
            torch.nn.BatchNorm2d(CHANNELS),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2, stride=2),
        )
        self.features = torch.nn.ModuleList([block(1), block(CHANNELS), block(CHANNELS)])
        self.fc = torch.nn.Sequential(
            torch.nn.Linear(CHANNELS * (MELS // 8), WIDTH),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.0),
            torch.nn.Linear(WIDTH, WIDTH),
            torch.nn.ReLU(),
        )
        project = lambda d: torch.nn.Sequential(
            torch.nn.Linear(d, CLASSES, bias=False),
            torch.nn.BatchNorm1d(CLASSES),
            torch.nn.ReLU(),
            torch.nn.Linear(CLASSES, CLASSES, bias=False),
            torch.nn.BatchNorm1d(CLASSES),
            torch.nn.ReLU(),
            torch.nn.Linear(CLASSES, CLASSES, bias=False),
        )
        self.projects = torch.nn.ModuleList([project(CHANNELS * MELS // 2**i) for i in (1, 2, 3)])
        self.classifier = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, x):  # (B, 1, mel, T)
        exits = []
        for block in self.features:
            x = block(x)
            frames = x.permute(0, 3, 2, 1)
            frames = frames.reshape(frames.shape[0], frames.shape[1], -1)
            exits.append(frames.mean(1))
        h = self.fc(frames)
        embedding = h.max(1)[0] + h.mean(1)
        return self.classifier(embedding), [p(e) for p, e in zip(self.projects, exits, strict=True)], embedding, exits


def torch_loss(clip, exits, y):
    """training_step's loss: 0.7 sum CE(exit) + CE(clip) + 0.3 sum KL + 0.003 sum (2 - 2 cos)."""
    kl = torch.nn.KLDivLoss(reduction='batchmean')
    cos = lambda a, b: (2 - 2 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)).mean()
    loss = F.cross_entropy(clip, y)
    for z in exits:
        loss = loss + 0.7 * F.cross_entropy(z, y) + 0.3 * kl(F.log_softmax(z, -1), F.softmax(clip, -1))
        loss = loss + 0.003 * cos(z, clip)
    return loss


def flax_variables(student):
    """The torch student's weights as jaxssl's Unfused variables."""
    t = lambda p: p.detach().numpy().copy()  # torch updates its running statistics in place
    params, stats = {'encoder': {}}, {'encoder': {}}
    for i, block in enumerate(student.features):
        conv, bn = block[0], block[1]
        params['encoder'][f'conv{i + 1}'] = {'kernel': t(conv.weight).transpose(2, 3, 1, 0), 'bias': t(conv.bias)}
        params['encoder'][f'bn{i + 1}'] = {'scale': t(bn.weight), 'bias': t(bn.bias)}
        stats['encoder'][f'bn{i + 1}'] = {'mean': t(bn.running_mean), 'var': t(bn.running_var)}
    for name, layer in (('fc1', student.fc[0]), ('fc2', student.fc[3]), ('classifier', student.classifier)):
        target = params if name == 'classifier' else params['encoder']
        target[name] = {'kernel': t(layer.weight).T, 'bias': t(layer.bias)}
    for i, project in enumerate(student.projects):
        name = f'project{i + 1}'
        params[name] = {f'fc{j + 1}': {'kernel': t(project[k].weight).T} for j, k in enumerate((0, 3, 6))}
        params[name].update({f'bn{j + 1}': {'scale': t(project[k].weight), 'bias': t(project[k].bias)}
                             for j, k in enumerate((1, 4))})  # fmt: skip
        stats[name] = {f'bn{j + 1}': {'mean': t(project[k].running_mean), 'var': t(project[k].running_var)}
                       for j, k in enumerate((1, 4))}  # fmt: skip
    return params, stats


@pytest.fixture
def reference():
    torch.manual_seed(0)
    student = TorchStudent()
    with torch.no_grad():  # non-trivial BatchNorm parameters and running statistics
        for module in student.modules():
            if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    params, stats = flax_variables(student)
    rng = np.random.default_rng(0)
    spectrogram = rng.normal(size=(BATCH, FRAMES, MELS)).astype(np.float32)  # jaxssl's (B, T, mel)
    labels = rng.integers(0, CLASSES, BATCH)
    model = audio_ntt.Unfused(CLASSES, CHANNELS, 3, WIDTH, dropout=0.0)
    return student, model, params, stats, spectrogram, labels


def test_student_and_loss_match_the_torch_reference_in_training(reference):
    student, model, params, stats, spectrogram, labels = reference
    x = torch.from_numpy(spectrogram).transpose(1, 2)[:, None]  # (B, 1, mel, T)
    student.train()
    clip, exits, embedding, taps = student(x)
    loss = torch_loss(clip, exits, torch.from_numpy(labels))
    loss.backward()

    def jax_loss(p):
        (clip, exits, embedding, taps), updated = model.apply(
            {'params': p, 'batch_stats': stats}, spectrogram, True, mutable=['batch_stats']
        )
        value, _ = self_distillation.self_distillation_loss(clip, exits, jnp.asarray(labels))
        return value, (embedding, taps, updated['batch_stats'])

    (value, (got_embedding, got_taps, new_stats)), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
    np.testing.assert_allclose(value, loss.item(), rtol=1e-5)
    np.testing.assert_allclose(got_embedding, embedding.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert [t.shape[-1] for t in got_taps] == [CHANNELS * MELS // 2, CHANNELS * MELS // 4, CHANNELS * MELS // 8]
    for got, want in zip(got_taps, taps, strict=True):  # the mel-major flatten order of the exits
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    torch_grads = {
        'conv1': student.features[0][0].weight.grad.numpy().transpose(2, 3, 1, 0),
        'fc2': student.fc[3].weight.grad.numpy().T,
        'classifier': student.classifier.weight.grad.numpy().T,
        'project3': student.projects[2][0].weight.grad.numpy().T,
    }
    got_grads = {
        'conv1': grads['encoder']['conv1']['kernel'],
        'fc2': grads['encoder']['fc2']['kernel'],
        'classifier': grads['classifier']['kernel'],
        'project3': grads['project3']['fc1']['kernel'],
    }
    for name, want in torch_grads.items():
        np.testing.assert_allclose(got_grads[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
    # Running statistics move 0.1 towards the batch's, as torch's (its variance is unbiased: n / (n - 1) apart).
    for got, bn in ((new_stats['encoder']['bn1'], student.features[0][1]), (new_stats['project2']['bn1'],
                     student.projects[1][1])):  # fmt: skip
        np.testing.assert_allclose(got['mean'], bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got['var'], bn.running_var.numpy(), rtol=0.25)  # the heads' n is the batch, 6


def test_student_matches_the_torch_reference_in_evaluation(reference):
    student, model, params, stats, spectrogram, _ = reference
    student.eval()
    with torch.no_grad():
        clip, exits, _, _ = student(torch.from_numpy(spectrogram).transpose(1, 2)[:, None])
    got_clip, got_exits, _, _ = model.apply({'params': params, 'batch_stats': stats}, spectrogram)
    np.testing.assert_allclose(got_clip, clip.numpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip(got_exits, exits, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_loss_terms_by_hand_and_nothing_is_detached():
    rng = np.random.default_rng(1)
    clip = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    exits = [jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2)]
    labels = jnp.asarray([0, 2, 1, 2])
    _, terms = self_distillation.self_distillation_loss(clip, exits, labels)
    softmax = lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    p = softmax(np.asarray(clip))
    kl = sum((p * (np.log(p) - np.log(softmax(np.asarray(z))))).sum() / 4 for z in exits)
    unit = lambda z: np.asarray(z) / np.linalg.norm(z, axis=-1, keepdims=True)
    cosine = sum(np.mean(2 - 2 * (unit(z) * unit(clip)).sum(-1)) for z in exits)
    np.testing.assert_allclose(terms['kl'], kl, rtol=1e-5)
    np.testing.assert_allclose(terms['cosine'], cosine, rtol=1e-5)
    np.testing.assert_allclose(terms['clip_ce'], -np.mean(np.log(p[np.arange(4), np.asarray(labels)])), rtol=1e-5)
    # The KL and cosine terms pull the classifier too (the reference detaches neither side).
    only_kl = lambda c: self_distillation.self_distillation_loss(c, exits, labels, exit_weight=0.0)[1]['kl']
    assert float(jnp.abs(jax.grad(only_kl)(clip)).max()) > 1e-3


def test_whitening_and_clustering_of_pseudo_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 5
    x = centres[np.repeat(np.arange(4), 50)] + rng.normal(size=(200, 6)) * np.array([0.1, 1, 1, 3, 3, 9])
    white = pseudo_labels.whiten(x, 5)
    np.testing.assert_allclose(white.T @ white / len(x), np.eye(5), atol=1e-8)  # identity covariance
    # The kept directions are the largest-variance ones: the top one is the 9-std axis, the 0.1-std one is dropped.
    wide = rng.normal(size=(500, 3)) * np.array([1.0, 10.0, 0.1])
    assert abs(np.corrcoef(pseudo_labels.whiten(wide, 1)[:, 0], wide[:, 1])[0, 1]) > 0.99
    assert max(abs(np.corrcoef(column, wide[:, 2])[0, 1]) for column in pseudo_labels.whiten(wide, 2).T) < 0.2
    with pytest.raises(ValueError, match='dimensions'):
        pseudo_labels.whiten(x, 7)
    with pytest.raises(ValueError, match='fewer than 3'):
        pseudo_labels.whiten(np.outer(rng.normal(size=50), rng.normal(size=4)), 3)  # rank 1


def test_pseudo_label_file_and_config_errors(tmp_path):
    config = load_config('configs/unfused.py:runlocal')
    assert config.optim.schedule == 'constant' and config.optim.name == 'sgd'
    assert config.input.features == 'byola_log_mel'
    with pytest.raises(ConfigError, match=r'input\.pseudo_labels'):
        unfused.Method(config).train_source()
    path = tmp_path / 'labels.npy'
    np.save(path, np.full(2000, 32, np.int32))
    config = load_config('configs/unfused.py:runlocal', [f'input.pseudo_labels={path}'])
    with pytest.raises(ConfigError, match=r'model\.classes'):
        unfused.Method(config).train_source()
    np.save(path, np.arange(2000, dtype=np.int32) % 32)
    source = unfused.Method(config).train_source()
    assert source.label_keys == ('label', 'pseudo_label') and source[33]['pseudo_label'] == 1
    with pytest.raises(ConfigError, match=r"input\.target_length.*'model\.blocks'"):
        load_config('configs/unfused.py:runlocal', ['model.blocks=7'])
    folder = load_config(
        'configs/unfused.py', ['input.data_root=/nonexistent', f'input.pseudo_labels={path}', 'model.width=64']
    )
    with pytest.raises(ConfigError, match=r'input\.norm_mean'):  # the built-in words' statistics on a folder
        unfused.Method(folder).train_source()
    with pytest.raises(ConfigError, match=r'loss\.kl_weight'):
        load_config('configs/unfused.py:runlocal', ['loss.kl_weight=-1.0'])
    with pytest.raises(ConfigError, match=r'input\.features'):
        load_config('configs/unfused.py:runlocal', ['input.features=waveform'])


def test_runlocal_sharded_matches_one_device_and_probes(tmp_path):
    path = tmp_path / 'labels.npy'
    np.save(path, np.random.default_rng(0).integers(0, 32, 2000).astype(np.int32))
    summary, rows = assert_sharded_matches_one_device(
        'configs/unfused.py:runlocal',
        tmp_path,
        f'input.pseudo_labels={path}',
        'model.channels=16',  # narrower than runlocal: the same code path at a quarter of the CPU time
        'model.width=64',
        keys=('loss', 'kl', 'clip_ce'),
        atol=1e-5,  # the first conv's kernel gradient sums 64 x 32 x 48 terms per tap, in another order on 8 devices
    )
    assert 0.0 <= summary['final_eval/label/embedding/knn'] <= 1.0
    assert np.isfinite(rows[-1]['exit3_accuracy'])
