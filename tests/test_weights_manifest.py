"""The weights manifest: schema, coverage of the seed papers' checkpoints, and timm registration."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import timm

import robust_resnets  # noqa: F401
from robust_resnets.weights import manifest as mf
from robust_resnets.weights.manifest import ManifestError, get_manifest, load_manifest, validate_entry
from robust_resnets.weights.registry import register_manifest

from _weights_fixtures import entry, write_manifest

# tags timm knows right after `import robust_resnets` (captured at collection, before any test registers more):
# every tag, and those it lists as pretrained (weights that can load)
TAGS_AT_IMPORT = set(timm.list_models(include_tags=True))
PRETRAINED_AT_IMPORT = set(timm.list_pretrained())
REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGED = load_manifest([REPO_ROOT / 'weights_manifest'])

# Table 2 "D&W" rows: the README's #P differs by a few percent from the WRN-A* it names (noted in the entries)
KNOWN_PARAM_GAPS = {'wrn_a1.cifar10_trades', 'wrn_a2.cifar10_trades', 'wrn_a3.cifar10_trades'}


def test_packaged_manifest_is_the_repo_folder():
    assert mf._PACKAGED_DIR.resolve() == (REPO_ROOT / 'weights_manifest').resolve()
    assert set(PACKAGED) == set(load_manifest([mf._PACKAGED_DIR]))


def test_every_entry_validates():
    # load_manifest validated every entry; re-check the merged records field by field too
    for name, w in PACKAGED.items():
        assert validate_entry(name, w.to_json()) == [], name
        assert w.hf_filename == 'model.safetensors' and w.hf_hub_id == f'robust-resnets/{name}'


def test_coverage_of_seed_papers():
    names = set(PACKAGED)
    rrn = [f'robust_resnet_a{i}' for i in range(1, 5)]
    wrn = ['wrn_28_10', 'wrn_34_12', 'wrn_46_14', 'wrn_70_16']
    for setting in ('cifar10_trades', 'cifar100_trades', 'cifar10_sat', 'cifar10_mart'):
        for arch in rrn + wrn:
            assert f'{arch}.{setting}' in names
    for setting in ('cifar10_trades', 'cifar100_trades'):
        for arch in ('robnet_large_v2', 'advrush', 'racl', 'wrn_34_r'):
            assert f'{arch}.{setting}' in names
    assert sum(n.startswith('preact_resnet.cifar10_trades_rrb_') for n in names) == 4  # Table 1
    assert sum(n.startswith('preact_resnet.cifar10_trades_d') for n in names) == 8  # Table 2 D and W rows
    assert {f'wrn_a{i}.cifar10_trades' for i in range(1, 5)} <= names  # Table 2 D&W rows
    assert 'robust_resnet_a1.cifar10_trades_extra500k' in names  # Table 3
    rb = PACKAGED['wrn_a4.cifar10_robustbench']
    assert rb.model_args['activations'] == 'SiLU' and rb.normalization['inside_model']
    for arch in ('wrn_28_10_swish', 'wrn_70_16_swish'):
        assert {f'{arch}.cifar10_score', f'{arch}.cifar100_score'} <= names
    assert PACKAGED['wrn_70_16_swish.cifar100_score'].model_args['input_mean'] == [0.5071, 0.4865, 0.4409]
    for arch in ('vit_small_convstem', 'vit_medium_convstem', 'vit_base_convstem', 'convnext_iso_convstem',
                 'convnext_tiny_convstem', 'convnext_small_convstem', 'convnext_base_convstem',
                 'convnext_large_convstem'):
        assert {f'{arch}.in1k_linf4', f'{arch}.in1k_clean_init'} <= names
    assert sum(n.endswith('.in1k_linf8_ft') for n in names) >= 1
    assert {'robnet_free.cifar10_pgd_at', 'robnet_large_v1.cifar10_pgd_at', 'robnet_large_v2.cifar10_pgd_at',
            'robnet_large_imagenet.in1k_pgd_at'} <= names


def test_spot_check_reported_numbers():
    a1 = PACKAGED['robust_resnet_a1.cifar10_trades'].reported
    assert (a1['clean'], a1['pgd20'], a1['cw40'], a1['autoattack']) == (85.46, 58.47, 55.72, 54.42)
    assert PACKAGED['robust_resnet_a4.cifar10_mart'].reported['cw40'] == 57.55
    assert PACKAGED['wrn_70_16_swish.cifar10_score'].reported['autoattack'] == 63.35
    assert PACKAGED['convnext_large_convstem.in1k_linf4'].reported['autoattack'] == 57.7
    assert PACKAGED['convnext_large_convstem.in1k_linf4'].eps_value == pytest.approx(4 / 255)


def test_nothing_is_published_without_a_checksum():
    for name, w in PACKAGED.items():
        if w.published:
            assert w.sha256 and w.size, name


def _build_on_meta(w):
    with torch.device('meta'):
        return timm.create_model(w.name, pretrained=False, num_classes=w.num_classes)


def _check_published_entries_build(manifest):
    """The rule for published entries: the architecture exists and builds with the entry's class count."""
    checked = []
    for name, w in manifest.items():
        if not w.published:
            continue
        assert timm.is_model(w.architecture), f'{name}: architecture {w.architecture} is not registered'
        model = _build_on_meta(w)
        assert model.num_classes == w.num_classes, name
        checked.append(name)
    return checked


def test_published_entries_build(tmp_path, monkeypatch):
    _check_published_entries_build(PACKAGED)
    fixture = {
        'preact_resnet.fx_pub': entry(published=True, sha256='0' * 64, size=10, model_args={'depths': [1, 1, 1]},
                                      num_classes=100, dataset='cifar100'),
        'no_such_arch.fx_pub': entry(published=True, sha256='1' * 64, size=10),
    }
    write_manifest(tmp_path, fixture)
    monkeypatch.setenv(mf.MANIFEST_DIR_ENV, str(tmp_path))
    register_manifest()
    with pytest.raises(AssertionError, match='no_such_arch is not registered'):
        _check_published_entries_build(load_manifest([tmp_path]))
    del fixture['no_such_arch.fx_pub']
    write_manifest(tmp_path, fixture)
    assert _check_published_entries_build(load_manifest([tmp_path])) == ['preact_resnet.fx_pub']


@functools.lru_cache(maxsize=None)
def _meta_summary(arch: str, args_json: str):
    """(params with 10 classes, num_features, number of InputNormalize modules) of an architecture, built on meta."""
    from robust_resnets.models.layers import InputNormalize

    try:
        with torch.device('meta'):
            model = timm.create_model(arch, num_classes=10, **json.loads(args_json))
    except RuntimeError as e:  # timm 1.0.9's ViT calls .item() while building, which meta tensors refuse
        if 'meta' not in str(e):
            raise
        model = timm.create_model(arch, num_classes=10, **json.loads(args_json))
    n_norm = sum(isinstance(m, InputNormalize) for m in model.modules())
    return sum(p.numel() for p in model.parameters()), model.num_features, n_norm


def _summary(w):
    return _meta_summary(w.architecture, json.dumps(dict(w.model_args), sort_keys=True))


def test_param_counts_match_reported():
    checked = 0
    for name, w in PACKAGED.items():
        params = w.reported.get('params_m')
        if params is None or name in KNOWN_PARAM_GAPS or not timm.is_model(w.architecture):
            continue
        n10, features, _ = _summary(w)
        n = (n10 + (w.num_classes - 10) * (features + 1)) / 1e6  # the head scales with the class count
        assert abs(n - params) <= 0.01 * params + 0.05, f'{name}: {n:.1f}M params built, {params}M reported'
        checked += 1
    assert checked >= 40


def test_original_layouts_are_ones_the_family_converts():
    """The layout an entry names (and its convert command passes as --layout) is one its family's filter takes."""
    from robust_resnets.weights.convert import family_module

    for name, w in PACKAGED.items():
        if not timm.is_model(w.architecture):
            continue
        layouts = set(family_module(w.architecture).CHECKPOINT_LAYOUTS) | {'timm'}
        assert w.original['layout'] in layouts, f"{name}: layout {w.original['layout']!r} not in {sorted(layouts)}"
        assert w.convert_command().endswith(f"--layout {w.original['layout']}")


def test_normalisation_inside_matches_the_architecture():
    """An entry with normalisation inside builds a model with one InputNormalize; one without, none."""
    for name, w in PACKAGED.items():
        if timm.is_model(w.architecture):
            expected = 1 if w.normalization['inside_model'] else 0
            assert _summary(w)[2] == expected, f'{name}: normalization.inside_model={bool(expected)}'


def test_every_tag_is_registered_with_timm():
    """Every tag has its cfg; timm.list_pretrained lists the tags whose weights can load (published or shipped)."""
    for name, w in get_manifest().items():
        if timm.is_model(w.architecture):
            assert name in TAGS_AT_IMPORT, name
            assert (name in PRETRAINED_AT_IMPORT) == (w.published or w.package_file is not None), name
    rrn = set(timm.list_models('robust_resnet*', include_tags=True))
    assert {n for n in PACKAGED if n.startswith('robust_resnet_')} <= rrn
    with pytest.raises(RuntimeError, match='not shipped yet|no published weights yet'):  # our message, not timm's
        timm.create_model('robust_resnet_a2.cifar100_trades', pretrained=True)
    cfg = timm.models.get_pretrained_cfg('robust_resnet_a2.cifar100_trades')
    assert cfg.num_classes == 100 and cfg.hf_hub_id == 'robust-resnets/robust_resnet_a2.cifar100_trades'
    assert cfg.mean == (0.0, 0.0, 0.0) and cfg.std == (1.0, 1.0, 1.0) and cfg.paper_ids == 'arXiv:2212.11005'
    # registering again changes nothing
    before = list(timm.models._registry._model_with_tags['robust_resnet_a2'])
    register_manifest()
    assert timm.models._registry._model_with_tags['robust_resnet_a2'] == before


def test_entries_of_unregistered_architectures_are_skipped(tmp_path):
    write_manifest(tmp_path, {'arch_from_a_later_issue.cifar10_x': entry(),
                              'preact_resnet.fx_now': entry(model_args={'depths': [1, 1, 1]})})
    done = register_manifest(load_manifest([tmp_path]))
    assert done == ['preact_resnet.fx_now']
    assert 'arch_from_a_later_issue.cifar10_x' not in timm.list_pretrained()


BROKEN = [
    ('missing field', lambda e: e.pop('license'), "missing fields \\['license'\\]"),
    ('unknown field', lambda e: e.update(lisence='mit'), 'unknown fields'),
    ('bad eps', lambda e: e.update(eps='8 over 255'), "eps must be written like '8/255'"),
    ('eps without threat', lambda e: e.update(threat_model=None), 'both be set'),
    ('class count', lambda e: e.update(num_classes=100), 'does not match dataset'),
    ('published without sha', lambda e: e.update(published=True), 'published entry needs its sha256'),
    ('bad sha', lambda e: e.update(sha256='ABC'), 'sha256 must be 64'),
    ('norm without mean', lambda e: e.update(normalization={'inside_model': True, 'mean': None, 'std': None}),
     'normalization.mean must list 3 numbers'),
    ('norm args differ', lambda e: e.update(
        normalization={'inside_model': True, 'mean': [0.5] * 3, 'std': [0.2] * 3},
        model_args={'input_mean': [0.4] * 3, 'input_std': [0.2] * 3}), 'model_args.input_mean'),
    ('mean outside model', lambda e: e.update(normalization={'inside_model': False, 'mean': [0.5] * 3, 'std': None}),
     'must be null when inside_model is false'),
    ('bad arxiv', lambda e: e['paper'].update(arxiv='arXiv:2212.11005'), 'arXiv id like'),
    ('bad repo id', lambda e: e['hf_hub'].update(repo_id='no-org'), "look like 'org/name'"),
    ('pickle on hub', lambda e: e['hf_hub'].update(filename='model.pth'), 'must be a .safetensors file'),
    ('percent range', lambda e: e['reported'].update(clean=185.4), 'percentage in \\[0, 100\\]'),
    ('numbers without source', lambda e: e['reported'].pop('source'), 'reported.source'),
    ('no locations', lambda e: e['original'].update(locations=[]), 'non-empty "locations"'),
    ('num_classes in model_args', lambda e: e.update(model_args={'num_classes': 10}), 'must not set num_classes'),
    ('package file elsewhere', lambda e: e.update(package_file='../x/model.safetensors', sha256='a' * 64, size=1),
     "package_file must be 'preact_resnet.fx/model.safetensors'"),
    ('package file nested', lambda e: e.update(package_file='preact_resnet.fx/a/model.safetensors', sha256='a' * 64,
                                               size=1), "package_file must be 'preact_resnet.fx/model.safetensors'"),
    ('package file without sha', lambda e: e.update(package_file='preact_resnet.fx/model.safetensors'),
     'package_file needs its sha256 and size'),
    ('unknown origin', lambda e: e.update(origin='me'), 'origin must be one of'),
    ('revision a branch', lambda e: e['hf_hub'].update(revision='main'), 'hf_hub.revision must be the 40-hex-digit'),
    ('unknown hf_hub key', lambda e: e['hf_hub'].update(branch='main'), 'optional "revision"'),
]


@pytest.mark.parametrize('what, breaker, message', BROKEN, ids=[b[0] for b in BROKEN])
def test_schema_rejects(what, breaker, message, tmp_path):
    good = entry()
    assert validate_entry('preact_resnet.fx', good) == []
    bad = copy.deepcopy(good)
    breaker(bad)
    write_manifest(tmp_path, {'preact_resnet.fx': bad})
    with pytest.raises(ManifestError, match=message):
        load_manifest([tmp_path])


def test_bad_names_duplicates_and_files(tmp_path):
    assert any('arch.tag' in e for e in validate_entry('Robust-ResNet', entry()))
    write_manifest(tmp_path, {'preact_resnet.fx': entry()}, 'a.json')
    write_manifest(tmp_path, {'preact_resnet.fx': entry()}, 'b.json')
    with pytest.raises(ManifestError, match='defined twice'):
        load_manifest([tmp_path])
    (tmp_path / 'b.json').write_text('{"entries": ')
    with pytest.raises(ManifestError, match='not valid JSON'):
        load_manifest([tmp_path])
    (tmp_path / 'b.json').write_text(json.dumps({'entries': {}, 'extra': 1}))
    with pytest.raises(ManifestError, match='unknown top-level keys'):
        load_manifest([tmp_path])


def test_hub_revision_pins_the_download(tmp_path):
    e = entry(published=True, sha256='0' * 64, size=10)
    e['hf_hub']['revision'] = 'a' * 40  # the commit `robust-resnets publish` printed
    write_manifest(tmp_path, {'preact_resnet.fx': e})
    w = load_manifest([tmp_path])['preact_resnet.fx']
    assert w.hf_revision == 'a' * 40 and w.to_json()['hf_hub']['revision'] == 'a' * 40
    assert get_manifest()['robust_resnet_a1.cifar10_trades'].hf_revision is None  # unpinned: main
    assert 'revision' in mf.ENTRY_FIELDS['hf_hub'][1]


@pytest.mark.parametrize('where', ['entry', 'field', 'nested'])
def test_duplicate_keys_are_refused(tmp_path, where):
    """JSON keeps the last of duplicate keys: a stale entry pasted beside its update would shadow it silently."""
    one = json.dumps(entry(), indent=1)
    if where == 'entry':
        text = f'{{"entries": {{"preact_resnet.fx": {one}, "preact_resnet.fx": {one}}}}}'
        key = 'preact_resnet.fx'
    elif where == 'field':
        text = f'{{"entries": {{"preact_resnet.fx": {one[:-1]}, "license": "unknown"}}}}}}'
        key = 'license'
    else:
        text = '{"entries": {"preact_resnet.fx": ' + one.replace('"clean": 80.0', '"clean": 80.0, "clean": 81.0') + '}}'
        key = 'clean'
    (tmp_path / 'dup.json').write_text(text)
    with pytest.raises(ManifestError, match=rf"dup\.json: key '{key}' appears twice in one object"):
        load_manifest([tmp_path])


def test_defaults_and_paper_merge(tmp_path):
    e = entry()
    paper, lic = e.pop('paper'), e.pop('license')
    (tmp_path / 'p.json').write_text(json.dumps({'paper': paper, 'defaults': {'license': lic},
                                                 'entries': {'preact_resnet.fx': e}}))
    w = load_manifest([tmp_path])['preact_resnet.fx']
    assert w.paper['arxiv'] == '2212.11005' and w.license == 'mit' and w.architecture == 'preact_resnet'
