"""Converters: checkpoints in the authors' key layouts convert, load strictly, and give the same logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import timm

import robust_resnets  # noqa: F401
from robust_resnets.cli import main as cli_main
from robust_resnets.weights.convert import convert_checkpoint, load_original_checkpoint
from robust_resnets.weights.manifest import validate_entry

from _weights_fixtures import (
    CIFAR10_MEAN, CIFAR10_STD, DMWideResNet, HuangPreActResNet, TradesWideResNet, ema_wrapped, entry,
    randomise_norms, use_manifest,
)

RRB = dict(block_types='robust_res_block', base_width=10, cardinality=4, se_reduction=16)
CASES = {
    # name: (reference module factory, manifest model_args, checkpoint wrapper, layout)
    'preact_resnet.fx_huang_rrb': (
        lambda: HuangPreActResNet((2, 1, 1), (16, 16, 32), block='rrb', scales=4),
        dict(depths=[2, 1, 1], channels=[16, 16, 32], scales=4, **RRB), 'ema', 'huang2022'),
    'preact_resnet.fx_huang_rrb_s1': (
        lambda: HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1),
        dict(depths=[1, 1, 1], channels=[16, 16, 32], scales=1, **RRB), 'plain', 'huang2022'),
    'preact_resnet.fx_huang_basic_silu_mu': (  # RobustBench's Huang2022Revisiting_WRN-A4 layout
        lambda: HuangPreActResNet((2, 2, 1), (16, 24, 16), block='basic', act='SiLU', pre_process=True),
        dict(depths=[2, 2, 1], channels=[16, 24, 16], activations='SiLU', input_mean=CIFAR10_MEAN,
             input_std=CIFAR10_STD), 'plain', 'huang2022'),
    'preact_resnet.fx_trades_wrn': (
        lambda: TradesWideResNet(depth=16, widen=2),
        dict(depths=[2, 2, 2], widths=[2, 2, 2]), 'state_dict', 'robustwrn'),
    'preact_resnet.fx_robustwrn': (
        lambda: TradesWideResNet(depth=10, widen=2, robustwrn_names=True),
        dict(depths=[1, 1, 1], widths=[2, 2, 2]), 'ema', 'robustwrn'),
    'preact_resnet.fx_dm_wrn': (
        lambda: DMWideResNet(depth=16, width=2),
        dict(depths=[2, 2, 2], widths=[2, 2, 2], activations='SiLU', padding='same', input_mean=CIFAR10_MEAN,
             input_std=CIFAR10_STD), 'score', 'dm_wrn'),
}


def _entries():
    out = {}
    for name, (_, args, _, layout) in CASES.items():
        norm = {'inside_model': False, 'mean': None, 'std': None}
        if 'input_mean' in args:
            norm = {'inside_model': True, 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD}
        out[name] = entry(name=name.split('.')[1], model_args=args, normalization=norm,
                          original={'locations': ['https://example.invalid/x.pth'], 'layout': layout, 'file': 'x.pth'})
    return out


@pytest.fixture()
def manifest(tmp_path, monkeypatch):
    use_manifest(monkeypatch, tmp_path / 'manifest', _entries())


def _save(obj, path: Path) -> Path:
    torch.save(obj, str(path))
    return path


def _checkpoint(ref: torch.nn.Module, wrapper: str) -> dict:
    if wrapper == 'ema':
        return ema_wrapped(ref)
    if wrapper == 'score':  # SCORE's weights-best.pt: {'model_state_dict': ...} with DataParallel prefixes
        return {'model_state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}
    if wrapper == 'state_dict':
        return {'state_dict': ref.state_dict(), 'epoch': 3}
    return ref.state_dict()


@pytest.mark.parametrize('name', sorted(CASES))
def test_convert_matches_reference_logits(name, manifest, tmp_path):
    factory, _, wrapper, layout = CASES[name]
    torch.manual_seed(0)
    ref = randomise_norms(factory()).eval()
    ckpt = _save(_checkpoint(ref, wrapper), tmp_path / 'original.pth')

    result = convert_checkpoint(ckpt, name=name, out_dir=tmp_path / 'out')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert result.entry['sha256'] == result.sha256 and result.entry['size'] == result.size

    model = timm.create_model(name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'out' / 'model.safetensors'))).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = ref(x), model(x)
    assert (actual - expected).abs().max().item() <= 1e-5

    # the same conversion with the layout forced gives the same file contents
    forced = convert_checkpoint(ckpt, name=name, out_dir=tmp_path / 'forced', layout=layout)
    assert forced.layout == layout
    from safetensors.torch import load_file
    a, b = load_file(str(tmp_path / 'out' / 'model.safetensors')), load_file(str(tmp_path / 'forced' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_outputs_carry_metadata_config_and_card(manifest, tmp_path):
    name = 'preact_resnet.fx_dm_wrn'
    ref = DMWideResNet(depth=16, width=2)
    ckpt = _save({'model_state_dict': ref.state_dict()}, tmp_path / 'weights-best.pt')
    result = convert_checkpoint(ckpt, name=name, out_dir=tmp_path / 'out')
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'out' / 'model.safetensors'), framework='pt') as f:
        meta = f.metadata()
    assert meta['architecture'] == 'preact_resnet' and meta['tag'] == 'fx_dm_wrn' and meta['num_classes'] == '10'
    assert meta['source_layout'] == 'dm_wrn' and len(meta['source_sha256']) == 64
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['architecture'] == 'preact_resnet' and config['num_classes'] == 10
    assert config['model_args']['padding'] == 'same'
    assert config['pretrained_cfg']['mean'] == [0.0, 0.0, 0.0] and 'hf_hub_id' not in config['pretrained_cfg']
    card = (tmp_path / 'out' / 'README.md').read_text()
    import yaml
    front = yaml.safe_load(card.split('---\n')[1])
    assert front['library_name'] == 'timm' and 'timm' in front['tags'] and front['datasets'] == ['cifar10']
    metrics = {m['name'].split(' ')[0]: m['value'] for m in front['model-index'][0]['results'][0]['metrics']}
    assert metrics == {'Clean': 80.0, 'PGD-20': 50.0}
    assert result.sha256 in card


def test_training_state_with_ema_needs_a_key(manifest, tmp_path, capsys):
    """timm's train.py (and ours) save the trained weights and their EMA side by side: --key picks one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    name = 'preact_resnet.fx_huang_rrb_s1'
    torch.manual_seed(0)
    trained, averaged = (HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1) for _ in range(2))
    ckpt = _save({'state_dict': trained.state_dict(), 'state_dict_ema': averaged.state_dict(), 'epoch': 9},
                 tmp_path / 'last.pth.tar')
    out = tmp_path / 'out'
    assert cli_main(['convert', str(ckpt), '--to', name, '--out', str(out)]) == 1
    assert 'ambiguous' in capsys.readouterr().err and not out.exists()
    assert cli_main(['convert', str(ckpt), '--to', name, '--out', str(out), '--key', 'nope']) == 1
    assert "no state dict under 'nope'; its dict entries are ['state_dict', 'state_dict_ema']" in capsys.readouterr().err
    assert cli_main(['convert', str(ckpt), '--to', name, '--out', str(out), '--key', 'state_dict_ema']) == 0
    ours = _save(averaged.state_dict(), tmp_path / 'ema_only.pth')
    convert_checkpoint(ours, name=name, out_dir=tmp_path / 'ema_only')
    a, b = load_file(str(out / 'model.safetensors')), load_file(str(tmp_path / 'ema_only' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        assert f.metadata()['source_key'] == 'state_dict_ema'


def test_state_dict_under_an_unusual_name_asks_for_key(manifest, tmp_path, capsys):
    """{'net': state_dict, 'acc': .., 'epoch': ..}: the error names the entry that holds the tensors and --key."""
    name = 'preact_resnet.fx_huang_rrb_s1'
    ref = HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)
    ckpt = _save({'net': ref.state_dict(), 'acc': 57.3, 'epoch': 99}, tmp_path / 'ckpt.pth')
    out = tmp_path / 'out'
    assert cli_main(['convert', str(ckpt), '--to', name, '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert "no tensors at its top level" in err and "the entries ['net'] hold tensors" in err and '--key net' in err
    assert not out.exists()
    assert cli_main(['convert', str(ckpt), '--to', name, '--out', str(out), '--key', 'net']) == 0


def test_checkpoint_without_num_batches_tracked_converts(manifest, tmp_path):
    """PyTorch < 0.4.1 saved no num_batches_tracked: the counters are filled with zeros, as for DARTS."""
    name = 'preact_resnet.fx_huang_rrb_s1'
    torch.manual_seed(0)
    ref = randomise_norms(HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)).eval()
    legacy = {k: v for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
    convert_checkpoint(_save(legacy, tmp_path / 'legacy.pth'), name=name, out_dir=tmp_path / 'out')
    model = timm.create_model(name, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'out' / 'model.safetensors'))).eval()
    counters = {k: v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    assert counters and all(v.item() == 0 for v in counters.values())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-5


def test_robustwrn_layout_refuses_a_strided_block_of_constant_width():
    # RobustWRN's shortcut reads such a block's raw input, ours the pre-activated one: its weights would not fit
    from robust_resnets.models.preact_resnet import checkpoint_filter_fn

    model = timm.create_model('preact_resnet', depths=(1, 1, 1), channels=(16, 16, 32))
    with pytest.raises(ValueError, match=r'stages\.1\.blocks\.0 is strided with 16 channels in and out'):
        checkpoint_filter_fn({}, model, layout='robustwrn')
    assert checkpoint_filter_fn(model.state_dict(), model, layout='huang2022')  # Huang et al.'s reads it as ours


def test_reconverted_entry_drops_a_stale_revision(tmp_path, monkeypatch):
    """A pinned entry keeps its revision for the same file; a different file is a new upload, pinned anew."""
    name = 'preact_resnet.fx_huang_rrb_s1'
    ckpt = _save(HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1).state_dict(), tmp_path / 'c.pth')
    entries = _entries()
    entries[name]['hf_hub']['revision'] = 'a' * 40
    use_manifest(monkeypatch, tmp_path / 'm1', entries)
    first = convert_checkpoint(ckpt, name=name, out_dir=tmp_path / 'out1')
    assert 'revision' not in first.entry['hf_hub']  # the manifest's sha256 (null) is not this file's
    entries[name].update(published=True, sha256=first.sha256, size=first.size)
    use_manifest(monkeypatch, tmp_path / 'm2', entries)
    again = convert_checkpoint(ckpt, name=name, out_dir=tmp_path / 'out2')  # byte-reproducible: the same file
    assert again.sha256 == first.sha256 and again.entry['hf_hub']['revision'] == 'a' * 40


def test_cli_convert_prints_entry(manifest, tmp_path, capsys):
    ref = HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)
    ckpt = _save(ref.state_dict(), tmp_path / 'ckpt.pth')
    out = tmp_path / 'cli_out'
    assert cli_main(['convert', str(ckpt), '--to', 'preact_resnet.fx_huang_rrb_s1', '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    entry_json = json.loads(printed[printed.index('{'):])
    got = entry_json['preact_resnet.fx_huang_rrb_s1']
    assert got['published'] is True and got['size'] == (out / 'model.safetensors').stat().st_size
    import hashlib
    assert got['sha256'] == hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest()
    # a second run refuses to overwrite without --overwrite
    assert cli_main(['convert', str(ckpt), '--to', 'preact_resnet.fx_huang_rrb_s1', '--out', str(out)]) == 1
    assert 'overwrite' in capsys.readouterr().err


def test_wrong_architecture_is_refused_and_nothing_written(manifest, tmp_path):
    ref = HuangPreActResNet((2, 1, 1), (16, 16, 32), block='rrb', scales=4)
    ckpt = _save(ref.state_dict(), tmp_path / 'ckpt.pth')
    with pytest.raises(RuntimeError, match='does not fit preact_resnet.fx_huang_rrb_s1.*--to'):
        convert_checkpoint(ckpt, name='preact_resnet.fx_huang_rrb_s1', out_dir=tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_wrong_class_count_is_refused(manifest, tmp_path):
    ref = TradesWideResNet(depth=16, widen=2, num_classes=100)
    ckpt = _save(ref.state_dict(), tmp_path / 'ckpt.pth')
    with pytest.raises(RuntimeError, match=r'10 classes.*shape mismatches \(checkpoint vs model\):.*head\.fc\.weight \(100, 128\) vs \(10, 128\)'):
        convert_checkpoint(ckpt, name='preact_resnet.fx_trades_wrn', out_dir=tmp_path / 'out')


class _Evil:
    def __reduce__(self):
        return (print, ('unpickled!',))


def test_pickles_are_opened_weights_only(tmp_path, capsys):
    path = _save({'state_dict': {}, 'payload': _Evil()}, tmp_path / 'evil.pth')
    with pytest.raises(ValueError, match='weights_only=True'):
        load_original_checkpoint(path)
    assert 'unpickled!' not in capsys.readouterr().out


def test_damaged_files_are_named_as_such(tmp_path):
    good = _save({'w': torch.ones(64, 64)}, tmp_path / 'good.pt')
    from safetensors.torch import save_file
    save_file({'w': torch.ones(64, 64)}, str(tmp_path / 'good.safetensors'))
    damaged = {
        'half.pt': good.read_bytes()[:good.stat().st_size // 2],
        'text.pt': b'hello\n',
        'empty.pt': b'',
        'half.safetensors': (tmp_path / 'good.safetensors').read_bytes()[:1000],
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        kind = 'safetensors file' if name.endswith('.safetensors') else 'PyTorch checkpoint'
        with pytest.raises(ValueError, match=f'is not a readable {kind}: it is incomplete, corrupt .* Download it'):
            load_original_checkpoint(tmp_path / name)


def test_unknown_entry_and_missing_file(manifest, tmp_path):
    with pytest.raises(ValueError, match='not in the weights manifest.*fx_dm_wrn'):
        convert_checkpoint(tmp_path / 'x.pth', name='preact_resnet.no_such_tag', out_dir=tmp_path / 'o')
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / 'x.pth', name='preact_resnet.fx_dm_wrn', out_dir=tmp_path / 'o')


def test_publish_dry_run_and_upload_calls(manifest, tmp_path, capsys, monkeypatch):
    ref = HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)
    out = tmp_path / 'out'
    convert_checkpoint(_save(ref.state_dict(), tmp_path / 'c.pth'), name='preact_resnet.fx_huang_rrb_s1', out_dir=out)
    repo = 'robust-resnets-test/fx_huang_rrb_s1'  # the fixture entry's hf_hub.repo_id
    assert cli_main(['publish', str(out), '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert f'Would upload preact_resnet.fx_huang_rrb_s1 to https://huggingface.co/{repo}' in printed
    assert 'model.safetensors' in printed
    assert cli_main(['publish', str(out), '--repo-id', 'org/fx', '--dry-run']) == 1  # not where timm looks
    assert f'downloads from {repo}' in capsys.readouterr().err
    assert cli_main(['publish', str(out), '--repo-id', 'org/fx', '--other-repo', '--dry-run']) == 0
    assert 'https://huggingface.co/org/fx' in capsys.readouterr().out

    calls = []
    oid = 'c0ffee' * 6 + 'c0ff'

    class CommitInfo(str):  # what upload_folder returns: a str (its URL) with the commit's fields
        commit_url = f'https://huggingface.co/{repo}/commit/{"0" * 40}'  # the oid is what counts
        oid = 'c0ffee' * 6 + 'c0ff'

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(('create_repo', repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(('upload_folder', kw))
            if kw['repo_id'] == repo:
                return CommitInfo(CommitInfo.commit_url)
            return 'https://huggingface.co/org/fx/commit/0'  # older huggingface_hub: the URL alone

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    assert cli_main(['publish', str(out)]) == 0
    assert calls[0][:2] == ('create_repo', repo) and calls[1][1]['repo_id'] == repo
    assert sorted(calls[1][1]['allow_patterns']) == ['README.md', 'config.json', 'model.safetensors']
    printed = capsys.readouterr().out
    pinned = json.loads(printed[printed.index('{'):])  # the hf_hub block to paste: the upload's commit pinned
    assert pinned == {'repo_id': repo, 'filename': 'model.safetensors', 'revision': oid}
    pasted = _entries()['preact_resnet.fx_huang_rrb_s1']
    pasted['hf_hub'] = pinned
    assert validate_entry('preact_resnet.fx_huang_rrb_s1', pasted) == []
    assert cli_main(['publish', str(out), '--repo-id', 'org/fx', '--other-repo']) == 0  # a copy: no pin offered
    assert 'hf_hub' not in capsys.readouterr().out

    (out / 'README.md').write_text('edited by hand')
    assert cli_main(['publish', str(out), '--repo-id', 'org/fx', '--dry-run']) == 1
    assert 'different conversions' in capsys.readouterr().err
    assert cli_main(['publish', str(tmp_path / 'nowhere'), '--repo-id', 'org/fx', '--dry-run']) == 1
    assert cli_main(['publish', str(out), '--repo-id', 'no-slash', '--other-repo', '--dry-run']) == 1
    capsys.readouterr()

    weights = out / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted copy
    assert cli_main(['publish', str(out), '--dry-run']) == 1
    assert 'not a readable safetensors file' in capsys.readouterr().err


def test_publish_refuses_a_file_the_manifest_would_reject(tmp_path, monkeypatch, capsys):
    ref = HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)
    name = 'preact_resnet.fx_huang_rrb_s1'
    entries = _entries()
    entries[name]['sha256'] = '0' * 64  # published earlier, from another conversion
    use_manifest(monkeypatch, tmp_path / 'manifest', entries)
    out = tmp_path / 'out'
    convert_checkpoint(_save(ref.state_dict(), tmp_path / 'c.pth'), name=name, out_dir=out)
    assert cli_main(['publish', str(out), '--dry-run']) == 1
    assert 'would fail the checksum' in capsys.readouterr().err


def test_unknown_licence_is_not_published_without_consent(tmp_path, monkeypatch, capsys):
    """pang2022-style entries ("ask the authors before redistributing"): the card says so, publish refuses."""
    ref = HuangPreActResNet((1, 1, 1), (16, 16, 32), block='rrb', scales=1)
    name = 'preact_resnet.fx_huang_rrb_s1'
    entries = _entries()
    entries[name].update(license='unknown', notes='No licence file; ask the authors before redistributing.')
    entries[name]['paper']['code'] = 'https://github.com/example/code'
    use_manifest(monkeypatch, tmp_path / 'manifest', entries)
    out = tmp_path / 'out'
    convert_checkpoint(_save(ref.state_dict(), tmp_path / 'c.pth'), name=name, out_dir=out)
    import yaml
    front = yaml.safe_load((out / 'README.md').read_text().split('---\n')[1])
    assert (front['license'], front['license_name'], front['license_link']) == (
        'other', 'unknown', 'https://github.com/example/code')  # the Hub's spec for an 'other' licence

    assert cli_main(['publish', str(out), '--dry-run']) == 1
    err = capsys.readouterr().err
    assert 'licence of these weights is unknown' in err and 'ask the authors' in err
    assert '--allow-unknown-license' in err
    assert cli_main(['publish', str(out), '--dry-run', '--allow-unknown-license']) == 0
    from robust_resnets.weights.publish import plan_upload
    assert plan_upload(out, allow_unknown_license=True).license == 'unknown'
    with pytest.raises(ValueError, match='licence of these weights is unknown'):
        plan_upload(out, repo_id='org/fx', other_repo=True)  # a copy elsewhere is redistribution too
