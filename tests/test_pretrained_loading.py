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

from _weights_fixtures import COMMIT, entry, populate_hf_cache, use_manifest, weight_files

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


def test_only_loadable_tags_are_listed(hub_env, tmp_path, monkeypatch):
    """Every tag has its cfg; timm.list_pretrained lists only those whose weights can load."""
    assert {NAME, 'preact_resnet.fx_unpublished'} <= set(timm.list_models('preact_resnet.fx_*', include_tags=True))
    assert NAME in timm.list_pretrained('preact_resnet.fx_*')
    assert 'preact_resnet.fx_unpublished' not in timm.list_pretrained('preact_resnet.fx_*')
    assert timm.models.get_pretrained_cfg('preact_resnet.fx_unpublished').tag == 'fx_unpublished'
    with pytest.raises(RuntimeError, match='no published weights yet'):  # not timm's "no pretrained weights"
        timm.create_model('preact_resnet.fx_unpublished', pretrained=True)
    use_manifest(monkeypatch, tmp_path / 'withdrawn', {NAME: entry(name='fx_tiny', model_args=TINY)})
    assert NAME not in timm.list_pretrained('preact_resnet.fx_*')  # a re-read manifest that no longer publishes it


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


@pytest.mark.parametrize('version, command', [('0.34.0', 'hf download'), ('1.2.0', 'hf download'),
                                              ('0.23.4', 'huggingface-cli download')])
def test_offline_empty_cache_says_what_to_do(hub_env, monkeypatch, version, command):
    """The command named is the one the installed huggingface_hub has (`hf` from 0.34)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, '__version__', version)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(RuntimeError, match=rf'HF_HUB_OFFLINE is set.*not in.*`{command} robust-resnets-test/fx_tiny '
                                           rf'model.safetensors`'):
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
    _, sd = tiny_weights
    local = tmp_path / 'model.safetensors'
    save_file(sd, str(local), metadata={'architecture': 'preact_resnet', 'tag': 'fx_unpublished', 'num_classes': '10',
                                        'model_args': '{"depths": [1, 1, 1], "widths": [1, 1, 1]}'})
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


def test_file_converted_for_another_tag_of_the_architecture(tmp_path, monkeypatch, tiny_weights):
    """A file made for a ReLU tag does not load silently into a SiLU tag of the same architecture (same tensors)."""
    import json

    _, sd = tiny_weights
    silu = dict(TINY, activations='SiLU')
    use_manifest(monkeypatch, tmp_path / 'manifest', {
        'preact_resnet.fx_relu': entry(name='fx_relu', model_args=TINY),
        'preact_resnet.fx_silu': entry(name='fx_silu', model_args=silu),
    })

    def converted(tag, args):  # the metadata robust-resnets convert writes
        path = tmp_path / f'{tag}.safetensors'
        save_file(sd, str(path), metadata={'architecture': 'preact_resnet', 'tag': tag, 'num_classes': '10',
                                           'model_args': json.dumps(args, sort_keys=True)})
        return dict(file=str(path))

    relu_file = converted('fx_relu', TINY)
    with pytest.raises(ValueError, match=r"converted for preact_resnet\.fx_relu, not preact_resnet\.fx_silu \(its "
                                         r"model_args .* differ .*\); create 'preact_resnet\.fx_relu' instead"):
        timm.create_model('preact_resnet.fx_silu', pretrained=True, pretrained_cfg_overlay=relu_file)
    _assert_loaded(timm.create_model('preact_resnet.fx_relu', pretrained=True, pretrained_cfg_overlay=relu_file), sd)
    stale = converted('fx_silu', TINY)  # converted before the entry's model_args changed
    with pytest.raises(ValueError, match=r"converted for preact_resnet\.fx_silu with model_args .* now builds it "
                                         r"with .*'activations': 'SiLU'.*re-convert"):
        timm.create_model('preact_resnet.fx_silu', pretrained=True, pretrained_cfg_overlay=stale)
    silu_file = converted('fx_silu', silu)
    _assert_loaded(timm.create_model('preact_resnet.fx_silu', pretrained=True, pretrained_cfg_overlay=silu_file), sd)


def test_overlay_naming_its_own_source_loads_it(hub_env, monkeypatch, tiny_weights, tmp_path):
    """pretrained_cfg_overlay=dict(hf_hub_id=...) or url=... loads the caller's weights, not the manifest's."""
    from huggingface_hub import constants

    cache, data, sha = hub_env
    populate_hf_cache(cache, REPO, 'model.safetensors', data, sha)  # the manifest's file is there too
    _, sd = tiny_weights
    mine = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / 'mine.safetensors'
    save_file(mine, str(path))
    populate_hf_cache(cache, 'someone/fine-tune', 'model.safetensors', path.read_bytes(),
                      hashlib.sha256(path.read_bytes()).hexdigest())
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # timm's own download reads the value of import time
    from robust_resnets.weights.pretrained import _timm_reaches_the_hub, _timm_takes_cache_dir

    for name in (NAME, 'preact_resnet.fx_unpublished'):
        overlay = dict(hf_hub_id='someone/fine-tune')
        if not _timm_reaches_the_hub():  # timm 1.0.9 with huggingface_hub >= 1.0: the error names the way round
            with pytest.raises(RuntimeError, match='hf_hub_download'):
                timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            from huggingface_hub import hf_hub_download

            file = hf_hub_download('someone/fine-tune', 'model.safetensors', cache_dir=cache, local_files_only=True)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file))
            _assert_loaded(model, mine)
            continue
        if _timm_takes_cache_dir():
            model = timm.create_model(name, pretrained=True, cache_dir=str(cache), pretrained_cfg_overlay=overlay)
        else:  # a timm without cache_dir downloads the overlay's file itself, from the cache the environment names
            with pytest.raises(TypeError, match='HF_HUB_CACHE'):
                timm.create_model(name, pretrained=True, cache_dir=str(cache), pretrained_cfg_overlay=overlay)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        _assert_loaded(model, mine)
        assert model.pretrained_cfg['hf_hub_id'] == 'someone/fine-tune'

    torch.save(mine, str(tmp_path / 'mine.pth'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(url=(tmp_path / 'mine.pth').as_uri()))
    _assert_loaded(model, mine)
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1]  # the tag still gives the architecture


def test_cache_dir_argument_finds_the_manifest_weights(hub_env, monkeypatch, tiny_weights, tmp_path):
    """create_model(..., cache_dir=...) reads the manifest's file from that cache, with every supported timm."""
    _, data, sha = hub_env
    elsewhere = tmp_path / 'elsewhere'
    populate_hf_cache(elsewhere, REPO, 'model.safetensors', data, sha)  # not in the cache the environment names
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    _assert_loaded(timm.create_model(NAME, pretrained=True, cache_dir=str(elsewhere)), tiny_weights[1])
    assert timm.create_model(NAME, pretrained=False, cache_dir=str(elsewhere)).num_classes == 10


def test_cache_dir_is_refused_only_where_an_older_timm_downloads(hub_env, monkeypatch, tmp_path):
    """With a timm that takes no cache_dir, it is used for the manifest's file and refused (naming the
    environment variables) for an overlay that timm downloads itself; it never reaches the model."""
    from robust_resnets.weights import pretrained

    monkeypatch.setattr(pretrained, '_timm_takes_cache_dir', lambda: False)
    resolve = pretrained.resolve_pretrained_kwargs
    assert 'cache_dir' not in resolve('preact_resnet', False, {'pretrained_cfg': 'fx_tiny', 'cache_dir': 'c'})
    with pytest.raises(TypeError, match='HF_HUB_CACHE'):
        resolve('preact_resnet', True, {'pretrained_cfg': 'fx_unpublished', 'cache_dir': 'c',
                                        'pretrained_cfg_overlay': {'url': 'https://example.org/w.pth'}})
    kept = resolve('preact_resnet', True, {'cache_dir': 'c', 'pretrained_cfg_overlay': {'state_dict': {}}})
    assert 'cache_dir' not in kept and kept['pretrained_cfg_overlay'] == {'state_dict': {}}


def test_an_argument_contradicting_the_tag_is_refused(hub_env):
    """A tag builds its checkpoint's architecture: a caller's argument that differs is refused (not overridden),
    one that agrees (a tuple for the manifest's list) is fine, and the untagged name builds the caller's."""
    for pretrained in (False, True):
        with pytest.raises(ValueError, match=r"contradicts your depths=\[2, 1, 1\].*'preact_resnet' without a tag"):
            timm.create_model(NAME, pretrained=pretrained, depths=[2, 1, 1])
    assert timm.create_model(NAME, depths=(1, 1, 1), widths=(1, 1, 1), num_classes=3).num_classes == 3
    assert [len(s.blocks) for s in timm.create_model('preact_resnet', depths=[2, 1, 1], widths=[1, 1, 1]).stages] \
        == [2, 1, 1]


def test_the_tags_architecture_is_compared_by_meaning():
    """Arguments equal in meaning to the tag's (its model_args and its entry point's) are accepted; another
    value of either is refused, with the untagged name as the way out."""
    import numpy as np
    import torch.nn as nn

    from robust_resnets.weights import get_manifest

    name = 'robust_resnet_a1.cifar10_trades_extra500k'
    mean = get_manifest()[name].model_args['input_mean']
    with torch.device('meta'):
        for same in (dict(activations='silu'), dict(activations=nn.SiLU), dict(activations=['SiLU'] * 3),
                     dict(input_mean=torch.tensor(mean, device='cpu')), dict(input_mean=np.array(mean)),
                     dict(depths=[14, 14, 7], widths=(5, 7, 3))):
            timm.create_model(name, **same)
        for other in (dict(activations='ReLU'), dict(input_mean=np.array(mean) + 0.01), dict(widths=(4, 7, 3))):
            with pytest.raises(ValueError, match="contradicts your .*'robust_resnet_a1' without a tag"):
                timm.create_model(name, **other)
        with pytest.raises(ValueError, match=r'\(widths=\(10, 10, 10\)\), which contradicts your widths=\(4, 4, 4\)'):
            timm.create_model('wrn_28_10.cifar10_trades', widths=(4, 4, 4))  # the entry point's, not model_args
        assert timm.create_model('wrn_28_10', widths=(4, 4, 4)).num_features == 4 * 64


def test_pinned_revision_survives_a_later_upload(hub_env, monkeypatch, tiny_weights, tmp_path):
    """An entry pinned to its upload's commit loads that file after main moved to a new upload."""
    cache, data, sha = hub_env
    populate_hf_cache(cache, REPO, 'model.safetensors', data, sha)  # the upload the entry was published from
    newer = data[:-1] + bytes([data[-1] ^ 1])
    populate_hf_cache(cache, REPO, 'model.safetensors', newer, hashlib.sha256(newer).hexdigest(), commit='c' * 40)
    pinned = {'repo_id': REPO, 'filename': 'model.safetensors', 'revision': COMMIT}
    use_manifest(monkeypatch, tmp_path / 'pinned', {NAME: entry(name='fx_tiny', model_args=TINY, published=True,
                                                                sha256=sha, size=len(data), hf_hub=pinned)})
    assert robust_resnets.weights.get_weights(NAME).hf_revision == COMMIT
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    _assert_loaded(timm.create_model(NAME, pretrained=True), tiny_weights[1])
    assert len(weight_files(cache)) == 4  # the newer upload's file is not touched

    missing = dict(pinned, revision='d' * 40)
    use_manifest(monkeypatch, tmp_path / 'missing', {NAME: entry(name='fx_tiny', model_args=TINY, published=True,
                                                                 sha256=sha, size=len(data), hf_hub=missing)})
    with pytest.raises(RuntimeError, match=rf'\(revision {"d" * 40}\) is not in.*--revision {"d" * 40}`'):
        timm.create_model(NAME, pretrained=True)


def test_manifest_folders_added_after_import(tmp_path, monkeypatch, tiny_weights):
    """Tags of a folder named after the import load without calling register_manifest() by hand."""
    from robust_resnets.weights import manifest as mf
    from _weights_fixtures import write_manifest

    _, sd = tiny_weights
    local = tmp_path / 'model.safetensors'
    save_file(sd, str(local))  # a training run's export: no tag in its metadata
    overlay = dict(file=str(local))
    monkeypatch.setattr(mf, '_EXTRA_DIRS', [])
    late = write_manifest(tmp_path / 'env', {'preact_resnet.fx_late_env': entry(name='fx_late_env', model_args=TINY)})
    monkeypatch.setenv(mf.MANIFEST_DIR_ENV, str(late.parent))
    _assert_loaded(timm.create_model('preact_resnet.fx_late_env', pretrained=True, pretrained_cfg_overlay=overlay), sd)

    added = write_manifest(tmp_path / 'added', {'preact_resnet.fx_late_add': entry(name='fx_late_add', model_args=TINY)})
    mf.add_manifest_dir(added.parent)
    assert 'preact_resnet.fx_late_add' in timm.list_models('preact_resnet.fx_late*', include_tags=True)
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
    paths: list = []

    def log_message(self, *args):
        pass

    def _resolve(self):
        self.paths.append(self.path.split('?')[0])
        m = re.match(r'^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$', self.path.split('?')[0])
        return self.files.get((m.group(1), m.group(3))) if m else None

    def _headers(self, data: bytes):
        self.send_response(200)
        revision = self.path.split('?')[0].split('/')[4]
        self.send_header('X-Repo-Commit', revision if re.fullmatch('[0-9a-f]{40}', revision) else 'b' * 40)
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
    handler = type('Handler', (_HubHandler,), {'files': {(REPO, 'model.safetensors'): data}, 'mode': 'good',
                                               'paths': []})
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
    assert set(handler.paths) == {f'/{REPO}/resolve/main/model.safetensors'}


def test_download_of_a_pinned_revision(local_hub, tiny_weights, tmp_path, monkeypatch):
    handler, cache = local_hub
    data = tiny_weights[0]
    sha = hashlib.sha256(data).hexdigest()
    pinned = {'repo_id': REPO, 'filename': 'model.safetensors', 'revision': COMMIT}
    use_manifest(monkeypatch, tmp_path / 'pinned', {NAME: entry(name='fx_tiny', model_args=TINY, published=True,
                                                                sha256=sha, size=len(data), hf_hub=pinned)})
    _assert_loaded(timm.create_model(NAME, pretrained=True), tiny_weights[1])
    assert set(handler.paths) == {f'/{REPO}/resolve/{COMMIT}/model.safetensors'}


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


def test_an_untagged_file_builds_the_architecture_recorded_with_it(tmp_path, tiny_weights):
    """Without a tag, pretrained_cfg_overlay=dict(file=...) builds what the file's metadata, or the training
    export's config.json beside it, records; a contradicting argument or another architecture is refused."""
    import json

    _, sd = tiny_weights
    export = tmp_path / 'run'
    export.mkdir()
    save_file(sd, str(export / 'model.safetensors'), metadata={'format': 'pt'})  # as the trainer exports
    (export / 'config.json').write_text(json.dumps({'architecture': 'preact_resnet', 'num_classes': 10,
                                                    'model_args': {**TINY, 'num_classes': 10}}))
    overlay = dict(file=str(export / 'model.safetensors'))
    model = timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=overlay)
    _assert_loaded(model, sd)
    assert timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=overlay, **TINY) is not None
    # fine-tuning: a new head is the caller's to choose (timm drops the old one)
    assert timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match=r"model.safetensors was trained as preact_resnet with depths=\[1, 1, 1\] "
                                         r"\(says .*config.json\), which contradicts your depths=\[2, 2, 2\]"):
        timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=overlay, depths=[2, 2, 2])
    with pytest.raises(ValueError, match=r"holds weights for 'preact_resnet' .*, not 'robust_resnet_a1'; create "
                                         r"'preact_resnet' with it instead"):
        timm.create_model('robust_resnet_a1', pretrained=True, pretrained_cfg_overlay=overlay)

    # a converted file's metadata: an argument without parameters (the activation) is built as recorded too
    converted = tmp_path / 'silu.safetensors'
    save_file(sd, str(converted), metadata={'format': 'pt', 'architecture': 'preact_resnet',
                                            'model_args': json.dumps({**TINY, 'activations': 'SiLU'})})
    model = timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=dict(file=str(converted)))
    _assert_loaded(model, sd)
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    with pytest.raises(FileNotFoundError, match='missing.safetensors does not exist'):
        timm.create_model('preact_resnet', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / 'missing.safetensors')))


def test_recorded_arguments_override_the_entry_points_and_adapt_to_the_callers_input(tmp_path):
    """An entry point's own arguments (wrn_28_10's depths and widths) give way to the recorded ones, as to a
    tag's; the caller's in_chans / img_size (and input statistics at another channel count) apply over them."""
    import json

    from robust_resnets.weights.pretrained import recorded_architecture, recorded_model_args

    cifar100 = dict(input_mean=[0.5071, 0.4865, 0.4409], input_std=[0.2673, 0.2564, 0.2762])
    args = dict(TINY, **cifar100)
    torch.manual_seed(0)
    sd = timm.create_model('wrn_28_10', num_classes=100, **args).state_dict()
    path = tmp_path / 'wrn.safetensors'
    save_file(sd, str(path), metadata={'format': 'pt', 'architecture': 'wrn_28_10', 'num_classes': '100',
                                       'model_args': json.dumps(args)})
    # the file's 100-class head is loaded, asked for or not
    for classes in ({'num_classes': 100}, {}):
        model = timm.create_model('wrn_28_10', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **classes)
        _assert_loaded(model, sd)
    # another class count: a fresh head on the file's body
    tuned = timm.create_model('wrn_28_10', pretrained=True, num_classes=7, pretrained_cfg_overlay=dict(file=str(path)))
    assert tuned.num_classes == 7 and torch.equal(tuned.stem.weight, sd['stem.weight'])
    assert [len(s.blocks) for s in model.stages] == [1, 1, 1]
    # a one-channel fine-tune with its own statistics: timm folds the first conv, as with a tag
    gray = timm.create_model('wrn_28_10', pretrained=True, num_classes=100, in_chans=1, input_mean=(0.5,),
                             input_std=(0.5,), pretrained_cfg_overlay=dict(file=str(path)))
    assert gray.stem.weight.shape[1] == 1 and gray(torch.rand(1, 1, 32, 32)).shape == (1, 100)
    # timm adapts a position embedding to another image size: the caller's applies, not a contradiction
    (tmp_path / 'vit').mkdir()
    (tmp_path / 'vit' / 'config.json').write_text(json.dumps(
        {'architecture': 'vit_s_convstem', 'model_args': {'img_size': [64, 64], 'in_chans': 3, 'depth': 2}}))
    assert recorded_model_args(tmp_path / 'vit' / 'config.json', architecture='vit_s_convstem',
                               kwargs={'img_size': 96}) == {'in_chans': 3, 'depth': 2}
    with pytest.raises(ValueError, match=r"with depth=2 \(says .*\), which contradicts your depth=3"):
        recorded_model_args(tmp_path / 'vit' / 'config.json', architecture='vit_s_convstem', kwargs={'depth': 3})

    # a run's train_config.yaml that names a tag records the tag's arguments too
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'train_config.yaml').write_text(
        'model:\n  name: preact_resnet.cifar10_trades_d5_5_2_w10_10_10\n  kwargs:\n    drop_rate: 0.1\n')
    (tmp_path / 'run' / 'last.pt').write_bytes(b'')
    arch, recorded, classes, where = recorded_architecture(tmp_path / 'run' / 'last.pt')
    assert (arch, classes, where.name) == ('preact_resnet', None, 'train_config.yaml')
    assert recorded == {'depths': [5, 5, 2], 'widths': [10, 10, 10], 'block_types': 'basic', 'drop_rate': 0.1}
