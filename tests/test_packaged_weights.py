"""Weights shipped inside the package: a training run -> convert (fp16) -> packaged file -> pretrained=True offline."""
from __future__ import annotations

import json
import os
import stat
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
import timm
from safetensors import safe_open

import robust_resnets  # noqa: F401
from robust_resnets.cli import main as cli_main
from robust_resnets.training import train
from robust_resnets.training.config import config_from_dict
from robust_resnets.weights import manifest as manifest_mod
from robust_resnets.weights.convert import convert_checkpoint, load_original_checkpoint
from robust_resnets.weights.hub import ChecksumError, sha256_file

from _training_fixtures import one_thread, random_cifar_data  # noqa: F401
from _weights_fixtures import entry, use_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depths=[1, 1, 1], widths=[1, 1, 1])
NAME = 'preact_resnet.fx_trained'
JPEG_NOTE = 'Trained and evaluated on JPEG-compressed CIFAR-10 images.'


def _trained_entry(**overrides):
    return entry(name='fx_trained', model_args=TINY, origin='robust-resnets', notes=JPEG_NOTE,
                 training='PGD-AT (robust-resnets quick_cifar10 recipe)',
                 original={'locations': ['robust-resnets train --config quick_cifar10'], 'layout': 'timm',
                           'file': 'model.safetensors'},
                 reported={'clean': 20.0, 'pgd20': 10.0, 'cw40': 9.5, 'autoattack': 9.0,
                           'source': 'robust-resnets eval, 1,000 test images'}, **overrides)


@pytest.fixture()
def trained_run(tmp_path, one_thread):  # noqa: F811
    """A real (tiny, two-step) training run's output folder."""
    cfg = config_from_dict({'model': {'name': 'preact_resnet', 'kwargs': TINY}, 'attack': {'steps': 1},
                            'eval': {'pgd_steps': 1, 'batch_size': 16},
                            'run': {'epochs': 1, 'batch_size': 24, 'progress': False}})
    train(cfg, tmp_path / 'run', data=random_cifar_data())
    return tmp_path / 'run'


@pytest.fixture()
def packaged_dir(tmp_path, monkeypatch):
    folder = tmp_path / 'packaged'
    folder.mkdir()
    monkeypatch.setattr(manifest_mod, 'PACKAGED_WEIGHTS_DIR', folder)
    monkeypatch.delenv('HF_ENDPOINT', raising=False)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty_hf_cache'))  # the Hub copy is never looked for
    return folder


def test_training_run_ships_in_the_package_and_loads_offline(trained_run, packaged_dir, tmp_path, monkeypatch,
                                                             capsys):
    manifest = tmp_path / 'manifest'
    use_manifest(monkeypatch, manifest, {NAME: _trained_entry()})
    with pytest.raises(RuntimeError, match='not shipped yet'):  # the message says how to ship it
        timm.create_model(NAME, pretrained=True)
    out = packaged_dir / NAME
    assert cli_main(['convert', str(trained_run / 'model.safetensors'), '--to', NAME, '--dtype', 'float16',
                     '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    new_entry = json.loads(printed[printed.index('{'):])[NAME]
    assert new_entry['package_file'] == f'{NAME}/model.safetensors'
    assert new_entry['published'] is False  # shipped in the package, not on the Hub
    assert new_entry['sha256'] == sha256_file(out / 'model.safetensors')

    params = {k for k, _ in timm.create_model('preact_resnet', **TINY).named_parameters()}
    with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        assert f.metadata()['dtype'] == 'float16'
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {dtypes[k] for k in params} == {torch.float16}
    assert {dtypes[k] for k in set(dtypes) - params} == {torch.float32, torch.int64}  # BN statistics stay exact
    card = (out / 'README.md').read_text()
    assert 'adversarially trained on CIFAR-10 by robust-resnets' in card and JPEG_NOTE in card
    assert 'Measured by robust-resnets' in card and "authors' numbers" not in card

    fields = {k: new_entry[k] for k in ('package_file', 'sha256', 'size')}
    use_manifest(monkeypatch, tmp_path / 'manifest_shipped', {NAME: _trained_entry(**fields)})
    model = timm.create_model(NAME, pretrained=True).eval()
    run_weights = timm.create_model('preact_resnet', **TINY)
    run_weights.load_state_dict(load_original_checkpoint(trained_run / 'model.safetensors'))
    for k, v in run_weights.state_dict().items():  # the fp32 run, its parameters rounded once to fp16
        expected = v.half().float() if k in params else v
        assert torch.equal(model.state_dict()[k], expected), k
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(model(x), run_weights.eval()(x), rtol=2e-2, atol=2e-2)
    assert not list((tmp_path / 'empty_hf_cache').rglob('*.safetensors'))


def _packaged_entry(packaged_dir, trained_run):
    result = convert_checkpoint(trained_run / 'model.safetensors', name=NAME, out_dir=packaged_dir / NAME,
                                dtype='float16')
    return {k: result.entry[k] for k in ('sha256', 'size')} | {'package_file': f'{NAME}/model.safetensors'}


def test_changed_or_missing_packaged_file_is_never_loaded(trained_run, packaged_dir, tmp_path, monkeypatch):
    use_manifest(monkeypatch, tmp_path / 'manifest', {NAME: _trained_entry()})
    fields = _packaged_entry(packaged_dir, trained_run)
    use_manifest(monkeypatch, tmp_path / 'manifest_shipped', {NAME: _trained_entry(**fields)})
    path = packaged_dir / NAME / 'model.safetensors'
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ChecksumError, match='Reinstall robust-resnets'):
        timm.create_model(NAME, pretrained=True)
    assert path.is_file()  # a package file is reported, never deleted
    path.unlink()
    with pytest.raises(RuntimeError, match='this installation lacks it'):
        timm.create_model(NAME, pretrained=True)
    path.write_bytes(data)
    timm.create_model(NAME, pretrained=True)


def test_conversion_is_byte_reproducible(trained_run, tmp_path, monkeypatch):
    """The same run converts to the same bytes (safetensors alone writes its metadata in hash-map order)."""
    use_manifest(monkeypatch, tmp_path / 'manifest', {NAME: _trained_entry()})
    files = [convert_checkpoint(trained_run / 'model.safetensors', name=NAME, out_dir=tmp_path / f'out{i}',
                                dtype='float16').out_dir / 'model.safetensors' for i in range(3)]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for path in (files[0], trained_run / 'model.safetensors'):  # not safetensors' owner-only default
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    with safe_open(str(files[0]), framework='pt') as f:
        meta = f.metadata()
        assert meta['name'] == NAME and meta['dtype'] == 'float16'
        assert torch.equal(f.get_tensor('head.fc.weight'),
                           load_original_checkpoint(trained_run / 'model.safetensors')['head.fc.weight'].half())


def test_convert_rejects_an_unknown_dtype(trained_run, tmp_path, monkeypatch):
    use_manifest(monkeypatch, tmp_path / 'manifest', {NAME: _trained_entry()})
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_checkpoint(trained_run / 'model.safetensors', name=NAME, out_dir=tmp_path / 'out', dtype='half')
    assert not (tmp_path / 'out').exists()


def test_the_wheel_ships_packaged_weights():
    """setuptools' package-data globs cover every file a packaged entry names, and its card beside it."""
    tomllib = pytest.importorskip('tomllib', reason='tomllib is in the standard library from Python 3.11')
    globs = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['package-data']
    patterns = globs['robust_resnets.weights']
    for rel in ('packaged/robust_resnet_a0.cifar10/model.safetensors', 'packaged/robust_resnet_a0.cifar10/README.md',
                'packaged/robust_resnet_a0.cifar10/config.json'):
        assert any(fnmatch(rel, p) for p in patterns), rel
    for w in robust_resnets.weights.get_manifest().values():
        if w.package_file:
            assert w.packaged_path.is_file(), f'{w.name}: {w.packaged_path} is missing'
            assert any(fnmatch(f'packaged/{w.package_file}', p) for p in patterns), w.name
