"""RobNets (robnet.py) and the DARTS-style AdvRush/RACL networks (darts.py): sizes, timm contract, checkpoints."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import List, Sequence

import pytest
import timm
import torch

import robust_resnets  # noqa: F401  (registers the models)
from robust_resnets.complexity import count_macs, count_params
from robust_resnets.models import darts, robnet
from robust_resnets.models.darts import GENOTYPES, DartsNetwork, Genotype
from robust_resnets.models.robnet import ARCH_CODES, RobNet

@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Many tiny kernels: one intra-op thread is far faster than several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- sizes against the printed numbers -------------------------------------------------------------
# Huang et al. 2022 (arXiv 2212.11005), CIFAR-10 comparison with searched architectures: #P (M), #F (G MACs).
# Their figures are printed to one decimal (params) and two (MACs) from a three-decimal print, so MACs
# are compared after rounding half-up to three and then two decimals, as a reader of their three-decimal
# print would (RobNet-large-v2: 5.0948G -> 5.095 -> 5.10; a single rounding would give 5.09).
PRINTED = [
    ('robnet_large_v2', 33.3, 5.10),
    ('advrush', 32.6, 4.97),
    ('racl', 32.5, 4.93),
]


def _printed(value: float, digits: int) -> float:
    return float(Decimal(repr(value)).quantize(Decimal(10) ** -digits, rounding=ROUND_HALF_UP))


def _meta_model(name: str, **kwargs):
    with torch.device('meta'):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize('name,params_m,macs_g', PRINTED)
def test_sizes_match_printed_table(name, params_m, macs_g):
    model = _meta_model(name)
    assert round(count_params(model) / 1e6, 1) == params_m
    assert _printed(_printed(count_macs(model) / 1e9, 3), 2) == macs_g


def test_released_robnet_configs():
    """RobNets' experiments/*/config.py: C=36, 20 cells (free, large v1), C=64, 33 cells (large v2), C=48 ImageNet."""
    free, v1, v2 = (_meta_model(n) for n in ('robnet_free', 'robnet_large_v1', 'robnet_large_v2'))
    assert (len(free.cells), len(v1.cells), len(v2.cells)) == (20, 20, 33)
    assert free.stem.conv.out_channels == v1.stem.conv.out_channels == 3 * 36
    assert v2.stem.conv.out_channels == 3 * 64
    assert [c for c in range(33) if v2.cells[c].ops[0].sep.conv_dw1.stride == (2, 2)] == [11, 22]
    assert len({tuple(c) for c in free.arch_code}) == 20 and len({tuple(c) for c in v1.arch_code}) == 1
    imnet = _meta_model('robnet_large_imagenet')
    assert imnet.num_classes == 1000 and imnet.stem.conv1.out_channels == 24
    assert isinstance(imnet.cells[0].preprocess0, darts.FactorizedReduce)
    assert imnet.pretrained_cfg['input_size'] == (3, 224, 224)


def test_cell_batch_norms_affine_as_in_authors_code():
    rob = timm.create_model('robnet_large_v1', C=4, layers=3)
    adv = timm.create_model('advrush', C=4, layers=3)
    rob_bns = [m for n, m in rob.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n.startswith('cells')]
    adv_bns = [m for n, m in adv.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n.startswith('cells')]
    assert rob_bns and not any(m.affine for m in rob_bns)
    assert adv_bns and all(m.affine for m in adv_bns)
    assert rob.stem.bn.affine and adv.stem.bn.affine


#: A three-cell RobNet code with every edge type, on strided and unstrided edges.
MIXED_CODE = [['11', '10', '01', '00', '10', '11', '00', '01', '11', '10', '01', '00', '11', '10']]

TINY = [
    ('robnet_large_v1', dict(C=4, layers=3, arch_code=MIXED_CODE)),
    ('robnet_large_v2', dict(C=4, layers=3)),
    ('advrush', dict(C=4, layers=3)),
    ('racl', dict(C=4, layers=3)),
]


@pytest.mark.parametrize('name,kwargs', TINY[::2] + [('robnet_large_imagenet', dict(C=4, layers=3))])
def test_count_macs_matches_torchprofile(name, kwargs):
    from torchprofile import profile_macs

    model = timm.create_model(name, **kwargs).eval()
    size = (3, 64, 64) if 'imagenet' in name else (3, 32, 32)
    assert count_macs(model, input_size=size) == profile_macs(model, torch.rand(1, *size))


# --- timm contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize('name,kwargs', TINY)
def test_forward_backward_and_features(name, kwargs):
    model = timm.create_model(name, **kwargs)
    x = torch.rand(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 8, 8)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_reset_classifier_and_num_classes():
    model = timm.create_model('racl', C=4, layers=3, num_classes=7)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(100)
    assert model.get_classifier().out_features == 100
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)
    model.reset_classifier(0)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, model.num_features)


@pytest.mark.parametrize('name,size,reductions', [
    ('robnet_large_v1', 32, [1, 2, 4]),
    ('advrush', 32, [1, 2, 4]),
    ('robnet_large_imagenet', 64, [4, 8, 16, 32]),
])
def test_features_only(name, size, reductions):
    model = timm.create_model(name, C=4, layers=3, features_only=True)
    outs = model(torch.rand(1, 3, size, size))
    assert model.feature_info.reduction() == reductions
    assert [o.shape[1] for o in outs] == model.feature_info.channels()
    assert [size // o.shape[-1] for o in outs] == reductions


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    model = timm.create_model('robnet_large_v1', C=4, layers=3)
    x = torch.rand(2, 3, 32, 32)
    ref = model(x)
    ref.sum().backward()
    ref_grad = model.stem.conv.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.stem.conv.weight.grad, ref_grad)


def test_drop_path_only_in_training():
    model = timm.create_model('advrush', C=4, layers=3, drop_path_rate=0.5).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))
    assert model.cells[0].drop_path.drop_prob == 0.5


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match='cell codes'):
        RobNet('robnet_free', C=4, layers=5, share=False)
    with pytest.raises(ValueError, match='unknown edge codes'):
        RobNet([['12'] * 14], C=4, layers=3)
    with pytest.raises(ValueError, match='14'):
        RobNet([['11'] * 13], C=4, layers=3)
    with pytest.raises(ValueError, match='Unknown genotype'):
        DartsNetwork('nope', C=4, layers=3)
    bad = GENOTYPES['racl']._replace(normal=[('sep_conv_9x9', 0), ('skip_connect', 1)])
    with pytest.raises(ValueError, match='unknown operation'):
        DartsNetwork(bad, C=4, layers=3)
    with pytest.raises(ValueError, match='even'):
        DartsNetwork('advrush', C=5, layers=3)


# --- checkpoints in the authors' layouts -----------------------------------------------------------
# The authors' key names, written out here from their module definitions (gmh14/RobNets
# models/basic_model.py + basic_operations.py; nutellamok/advrush eval/model.py + operations.py), in
# their registration order, independently of the mapping in robust_resnets.models.darts.
def _bn(prefix: str, affine: bool) -> List[str]:
    return ([f'{prefix}.weight', f'{prefix}.bias'] if affine else []) + \
        [f'{prefix}.running_mean', f'{prefix}.running_var', f'{prefix}.num_batches_tracked']


def _relu_conv_bn(p: str, affine: bool) -> List[str]:
    return [f'{p}.op.1.weight'] + _bn(f'{p}.op.2', affine)


def _factorized_reduce(p: str, affine: bool) -> List[str]:
    return [f'{p}.conv_1.weight', f'{p}.conv_2.weight'] + _bn(f'{p}.bn', affine)


def _sep_conv(p: str, affine: bool) -> List[str]:
    return [f'{p}.op.1.weight', f'{p}.op.2.weight'] + _bn(f'{p}.op.3', affine) + \
        [f'{p}.op.5.weight', f'{p}.op.6.weight'] + _bn(f'{p}.op.7', affine)


def _stem(imagenet: bool) -> List[str]:
    if imagenet:
        return (['stem0.0.weight'] + _bn('stem0.1', True) + ['stem0.3.weight'] + _bn('stem0.4', True) +
                ['stem1.1.weight'] + _bn('stem1.2', True))
    return ['stem.0.weight'] + _bn('stem.1', True)


def _cells(layers: int, imagenet: bool, affine: bool, edge_keys) -> List[str]:
    keys, reduction_prev = [], imagenet
    for i in range(layers):
        reduction = i in (layers // 3, 2 * layers // 3)
        p = f'cells.{i}'
        keys += (_factorized_reduce if reduction_prev else _relu_conv_bn)(f'{p}.preprocess0', affine)
        keys += _relu_conv_bn(f'{p}.preprocess1', affine)
        keys += edge_keys(i, p, reduction)
        reduction_prev = reduction
    return keys


def robnets_keys(codes: Sequence[Sequence[str]], layers: int, imagenet: bool = False, steps: int = 4) -> List[str]:
    def edges(i, p, reduction):
        out, k = [], 0
        for node in range(steps):
            for j in range(2 + node):
                q, strided, code = f'{p}._ops.{k}.op', reduction and j < 2, codes[i][k]
                if code == '01':
                    out += _sep_conv(q, False)
                elif code == '10' and strided:
                    out += _factorized_reduce(q, False)
                elif code == '11':
                    out += _sep_conv(f'{q}.conv', False) + (_factorized_reduce(f'{q}.res', False) if strided else [])
                k += 1
        return out
    return _stem(imagenet) + _cells(layers, imagenet, False, edges) + ['classifier.weight', 'classifier.bias']


def darts_keys(genotype: Genotype, layers: int) -> List[str]:
    def edges(i, p, reduction):
        out = []
        for k, (name, index) in enumerate(genotype.reduce if reduction else genotype.normal):
            q, strided = f'{p}._ops.{k}', reduction and index < 2
            if name.startswith('sep_conv'):
                out += _sep_conv(q, True)
            elif name.startswith('dil_conv'):
                out += [f'{q}.op.1.weight', f'{q}.op.2.weight'] + _bn(f'{q}.op.3', True)
            elif name == 'skip_connect' and strided:
                out += _factorized_reduce(q, True)
        return out
    return _stem(False) + _cells(layers, False, True, edges) + ['classifier.weight', 'classifier.bias']


def _randomise(model: torch.nn.Module) -> None:
    """Random batch-norm statistics and affine parameters, so that a misplaced tensor changes the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    model.eval()


CHECKPOINT_CASES = [
    ('robnet_free', dict(C=2), lambda m: robnets_keys(ARCH_CODES['robnet_free'], 20), robnet, 'robnets'),
    ('robnet_large_v2', dict(C=4, layers=4), lambda m: robnets_keys(ARCH_CODES['robnet_large'] * 4, 4),
     robnet, 'robnets'),
    ('robnet_large_imagenet', dict(C=4, layers=3, num_classes=10, arch_code=MIXED_CODE),
     lambda m: robnets_keys(MIXED_CODE * 3, 3, imagenet=True), robnet, 'robnets'),
    ('advrush', dict(C=4, layers=4), lambda m: darts_keys(GENOTYPES['advrush'], 4), darts, 'darts'),
    ('racl', dict(C=4, layers=4), lambda m: darts_keys(GENOTYPES['racl'], 4), darts, 'darts'),
]


@pytest.mark.parametrize('name,kwargs,keys_fn,family,layout', CHECKPOINT_CASES)
def test_original_checkpoint_loads_with_identical_logits(tmp_path, name, kwargs, keys_fn, family, layout):
    source = timm.create_model(name, **kwargs)
    _randomise(source)
    keys = keys_fn(source)
    ours = source.state_dict()
    assert len(keys) == len(ours)
    assert list(darts.original_keys(source).values()) == keys
    original = {f'module.{k}': v.clone() for k, v in zip(keys, ours.values())}
    if layout == 'darts':  # the auxiliary tower of AdvRush training runs is dropped
        original['module.auxiliary_head.classifier.weight'] = torch.zeros(10, 768)
    path = tmp_path / 'ckpt.pth.tar'
    torch.save({'epoch': 1, 'state_dict': original, 'best_acc': 0.5}, path)

    loaded = torch.load(path, map_location='cpu', weights_only=True)
    assert family.detect_layout({k[len('module.'):]: v for k, v in loaded['state_dict'].items()}) == layout
    target = timm.create_model(name, **kwargs).eval()
    target.load_state_dict(family.checkpoint_filter_fn(loaded, target), strict=True)
    x = torch.rand(2, 3, 64, 64) if 'imagenet' in name else torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)

    # ours round-trips too, and old checkpoints without num_batches_tracked still load strictly
    again = family.checkpoint_filter_fn(target.state_dict(), target)
    assert family.detect_layout(again) == 'timm'
    legacy = {k: v for k, v in loaded['state_dict'].items() if not k.endswith('num_batches_tracked')}
    target.load_state_dict(family.checkpoint_filter_fn(legacy, target, layout=layout), strict=True)


def test_layouts_are_not_confused():
    rob = timm.create_model('robnet_large_v1', C=4, layers=3)
    adv = timm.create_model('advrush', C=4, layers=3)
    rob_sd = {v: t for v, t in zip(darts.original_keys(rob).values(), rob.state_dict().values())}
    adv_sd = {v: t for v, t in zip(darts.original_keys(adv).values(), adv.state_dict().values())}
    with pytest.raises(ValueError, match='robnet'):
        darts.detect_layout(rob_sd)
    with pytest.raises(ValueError, match='RobNet'):
        robnet.detect_layout(adv_sd)
    with pytest.raises(ValueError, match="Unknown layout"):
        robnet.checkpoint_filter_fn(rob_sd, rob, layout='darts')
