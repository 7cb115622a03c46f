"""pretrained=True: the Hugging Face cache offline, a local Hub-like server, checksums and clear failures."""
from __future__ import annotations

import hashlib
import http.server
import re
import threading

import pytest
import torch
import timm
from safetensors.torch import save_file

import robust_resnets  # noqa: F401
from robust_resnets.weights.hub import ChecksumError

from _weights_fixtures import entry, populate_hf_cache, use_manifest, weight_files

NAME = 'preact_resnet.fx_tiny'
REPO = 'robust-resnets-test/fx_tiny'
TINY = dict(depths=[1, 1, 1], widths=[1, 1, 1])


@pytest.fixture(scope='module')
def tiny_weights(tmp_path_factory):
    """A converted-style model.safetensors of the tiny fixture model: (bytes, state dict)."""
    torch.manual_seed(0)
    model = timm.create_model('preact_resnet', num_classes=10, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp('w') / 'model.safetensors'
    save_file(sd, str(path), metadata={'format': 'pt', 'architecture': 'preact_resnet', 'tag': 'fx_tiny',
                                       'num_classes': '10'})
    return path.read_bytes(), sd


@pytest.fixture()
def hub_env(tmp_path, monkeypatch, tiny_weights):
    """Fixture manifest (one published and one unpublished entry) and an empty HF cache in tmp_path."""
    data, _ = tiny_weights
    sha = hashlib.sha256(data).hexdigest()
    use_manifest(monkeypatch, tmp_path / 'manifest', {
        NAME: entry(name='fx_tiny', model_args=TINY, published=True, sha256=sha, size=len(data)),
        'preact_resnet.fx_unpublished': entry(name='fx_unpublished', model_args=TINY),
    })
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.delenv('HF_ENDPOINT', raising=False)
    return cache, data, sha


def _assert_loaded(model, sd, skip=()):
    msd = model.state_dict()
    for k, v in sd.items():
        if k not in skip:
            assert torch.equal(msd[k], v), k


def test_tags_are_listed(hub_env):
    assert {NAME, 'preact_resnet.fx_unpublished'} <= set(timm.list_pretrained('preact_resnet.fx_*'))


def test_offline_cache_loads(hub_env, monkeypatch, tiny_weights):
    cache, data, sha = hub_env
    populate_hf_cache(cache, REPO, 'model.safetensors', data, sha)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    _, sd = tiny_weights

    model = timm.create_model(NAME, pretrained=True)
    _assert_loaded(model, sd)
    assert model.pretrained_cfg['tag'] == 'fx_tiny'

    finetune = timm.create_model(NAME, pretrained=True, num_classes=5)  # head dropped, body loaded
    assert finetune.head.fc.out_features == 5
    _assert_loaded(finetune, sd, skip=('head.fc.weight', 'head.fc.bias'))

    feats = timm.create_model(NAME, pretrained=True, features_only=True)
    assert torch.equal(feats.state_dict()['stem.weight'], sd['stem.weight'])
    outs = feats(torch.rand(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == feats.feature_info.channels()


def test_offline_empty_cache_says_what_to_do(hub_env, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(RuntimeError, match=r'HF_HUB_OFFLINE is set.*not in.*hf download robust-resnets-test/fx_tiny'):
        timm.create_model(NAME, pretrained=True)


def test_cached_file_with_wrong_checksum_is_deleted(hub_env, monkeypatch):
    cache, data, sha = hub_env
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    populate_hf_cache(cache, REPO, 'model.safetensors', bytes(bad), sha)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(ChecksumError, match='sha256.*deleted from the cache and not loaded'):
        timm.create_model(NAME, pretrained=True)
    assert weight_files(cache) == []


def test_unpublished_entry_points_to_original_and_converter(hub_env):
    with pytest.raises(RuntimeError) as e:
        timm.create_model('preact_resnet.fx_unpublished', pretrained=True)
    msg = str(e.value)
    assert 'no published weights yet' in msg and 'https://example.invalid/ckpt.pth' in msg
    assert 'robust-resnets convert CHECKPOINT --to preact_resnet.fx_unpublished' in msg


def test_local_file(hub_env, tiny_weights, tmp_path):
    data, sd = tiny_weights
    local = tmp_path / 'model.safetensors'
    local.write_bytes(data)
    # the unpublished entry loads from a local file; timm 1.0.9 and newer take the same route
    model = timm.create_model('preact_resnet.fx_unpublished', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(local)))
    _assert_loaded(model, sd)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'nope.safetensors')))
    pickled = tmp_path / 'model.pth'
    torch.save(sd, str(pickled))
    with pytest.raises(ValueError, match='not a .safetensors file.*robust-resnets convert'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(pickled)))


def test_file_for_another_architecture_or_class_count(hub_env, tmp_path, tiny_weights):
    _, sd = tiny_weights
    other = tmp_path / 'other.safetensors'
    save_file(sd, str(other), metadata={'architecture': 'wrn_28_10', 'tag': 'cifar10_trades', 'num_classes': '10'})
    with pytest.raises(ValueError, match="holds weights for 'wrn_28_10'"):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))
    hundred = tmp_path / 'hundred.safetensors'
    save_file(sd, str(hundred), metadata={'architecture': 'preact_resnet', 'num_classes': '100'})
    with pytest.raises(ValueError, match='100-class head.*num_classes=N'):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(hundred)))


def test_manifest_folders_added_after_import(tmp_path, monkeypatch, tiny_weights):
    """Tags of a folder named after the import load without calling register_manifest() by hand."""
    from robust_resnets.weights import manifest as mf
    from _weights_fixtures import write_manifest

    data, sd = tiny_weights
    local = tmp_path / 'model.safetensors'
    local.write_bytes(data)
    overlay = dict(file=str(local))
    monkeypatch.setattr(mf, '_EXTRA_DIRS', [])
    late = write_manifest(tmp_path / 'env', {'preact_resnet.fx_late_env': entry(name='fx_late_env', model_args=TINY)})
    monkeypatch.setenv(mf.MANIFEST_DIR_ENV, str(late.parent))
    _assert_loaded(timm.create_model('preact_resnet.fx_late_env', pretrained=True, pretrained_cfg_overlay=overlay), sd)

    added = write_manifest(tmp_path / 'added', {'preact_resnet.fx_late_add': entry(name='fx_late_add', model_args=TINY)})
    mf.add_manifest_dir(added.parent)
    assert 'preact_resnet.fx_late_add' in timm.list_pretrained('preact_resnet.fx_late*')
    _assert_loaded(timm.create_model('preact_resnet.fx_late_add', pretrained=True, pretrained_cfg_overlay=overlay), sd)

    clash = write_manifest(tmp_path / 'clash', {'preact_resnet.fx_late_add': entry(name='fx_late_add')})
    with pytest.raises(mf.ManifestError, match='defined twice'):
        mf.add_manifest_dir(clash.parent)
    assert mf.manifest_dirs()[1:2] == [added.parent]  # the bad folder was not kept


def test_other_in_chans_with_standardisation_inside(tmp_path, monkeypatch):
    """A checkpoint that standardises inside loads into a 1-channel model with the caller's own statistics."""
    from robust_resnets.models.layers import CIFAR10_MEAN, CIFAR10_STD

    args = dict(TINY, input_mean=list(CIFAR10_MEAN), input_std=list(CIFAR10_STD))
    use_manifest(monkeypatch, tmp_path / 'manifest', {'preact_resnet.fx_norm_inside': entry(
        name='fx_norm_inside', model_args=args,
        normalization={'inside_model': True, 'mean': list(CIFAR10_MEAN), 'std': list(CIFAR10_STD)})})
    torch.manual_seed(0)
    sd = timm.create_model('preact_resnet', **args).state_dict()
    path = tmp_path / 'model.safetensors'
    save_file(sd, str(path))
    overlay = dict(file=str(path))
    with pytest.raises(ValueError, match='in_chans=1; pass input_mean and input_std with 1 values each'):
        timm.create_model('preact_resnet.fx_norm_inside', pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay)
    gray = timm.create_model('preact_resnet.fx_norm_inside', pretrained=True, in_chans=1, input_mean=[0.5],
                             input_std=[0.25], pretrained_cfg_overlay=overlay)
    assert gray.normalize.mean.flatten().tolist() == [0.5] and gray.normalize.std.flatten().tolist() == [0.25]
    assert torch.allclose(gray.stem.weight, sd['stem.weight'].sum(dim=1, keepdim=True))  # timm's adaptation
    _assert_loaded(gray, sd, skip=('stem.weight', 'normalize.mean', 'normalize.std'))


def test_model_args_and_untagged_default(hub_env):
    model = timm.create_model(NAME)
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1]
    # a tag's model_args override the entry point's defaults (wrn_28_10_swish defaults to CIFAR-10 statistics)
    c100 = timm.create_model('wrn_28_10_swish.cifar100_score')
    assert torch.allclose(c100.normalize.mean.flatten(), torch.tensor([0.5071, 0.4865, 0.4409]))
    assert torch.allclose(timm.create_model('wrn_28_10_swish').normalize.mean.flatten(),
                          torch.tensor([0.4914, 0.4822, 0.4465]))
    with pytest.raises(RuntimeError, match="'preact_resnet' has no untagged pretrained weights.*fx_tiny"):
        timm.create_model('preact_resnet', pretrained=True)


# --- a local Hub: the resolve endpoint served from 127.0.0.1 ---------------------------------------------
class _HubHandler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    mode = 'good'

    def log_message(self, *args):
        pass

    def _resolve(self):
        m = re.match(r'^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$', self.path.split('?')[0])
        return self.files.get((m.group(1), m.group(3))) if m else None

    def _headers(self, data: bytes):
        self.send_response(200)
        self.send_header('X-Repo-Commit', 'b' * 40)
        self.send_header('ETag', '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header('Content-Length', str(len(data)))
        self.send_header('Content-Type', 'application/octet-stream')
        self.end_headers()

    def do_HEAD(self):
        data = self._resolve()
        if data is None:
            self.send_error(404)
            return
        self._headers(data)

    def do_GET(self):
        data = self._resolve()
        if data is None:
            self.send_error(404)
            return
        self._headers(data)
        if self.mode == 'corrupt':
            body = bytearray(data)
            body[len(body) // 2] ^= 0xFF
            self.wfile.write(bytes(body))
        elif self.mode == 'truncated':
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
        else:
            self.wfile.write(data)


@pytest.fixture()
def local_hub(hub_env, monkeypatch):
    cache, data, sha = hub_env
    handler = type('Handler', (_HubHandler,), {'files': {(REPO, 'model.safetensors'): data}, 'mode': 'good'})
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{server.server_address[1]}')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    yield handler, cache
    server.shutdown()
    server.server_close()


def test_download_from_hub_loads(local_hub, tiny_weights):
    handler, cache = local_hub
    model = timm.create_model(NAME, pretrained=True)
    _assert_loaded(model, tiny_weights[1])
    assert any(p.name == 'model.safetensors' for p in weight_files(cache))


@pytest.mark.parametrize('mode, error, match', [
    ('corrupt', ChecksumError, 'sha256.*deleted from the cache and not loaded'),
    ('truncated', RuntimeError, 'downloading robust-resnets-test/fx_tiny/model.safetensors failed.*nothing was kept'),
])
def test_bad_download_is_refused_and_nothing_left(local_hub, mode, error, match):
    handler, cache = local_hub
    handler.mode = mode
    with pytest.raises(error, match=match):
        timm.create_model(NAME, pretrained=True)
    assert weight_files(cache) == []
