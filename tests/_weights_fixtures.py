"""Shared fixtures of the weights tests: test-only manifest entries, a fake Hugging Face cache, and small
re-implementations of the authors' checkpoint key layouts (written for these tests from the layouts'
key names and forward passes; no code of the original repositories)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2471, 0.2435, 0.2616]
COMMIT = 'a' * 40


# --- manifest fixtures -------------------------------------------------------------------------------
def entry(*, model_args: Optional[Dict[str, Any]] = None, published: bool = False, sha256: Optional[str] = None,
          size: Optional[int] = None, num_classes: int = 10, dataset: str = 'cifar10', name: str = '',
          **overrides: Any) -> Dict[str, Any]:
    """A complete, valid manifest entry for a small test checkpoint."""
    out = {
        'dataset': dataset, 'num_classes': num_classes, 'input_size': [3, 32, 32],
        'normalization': {'inside_model': False, 'mean': None, 'std': None},
        'threat_model': 'Linf', 'eps': '8/255', 'training': 'TRADES', 'extra_data': None,
        'paper': {'title': 'A test paper', 'arxiv': '2212.11005', 'authors': 'Test Author'},
        'reported': {'clean': 80.0, 'pgd20': 50.0, 'cw40': None, 'autoattack': None, 'source': 'test fixture'},
        'original': {'locations': ['https://example.invalid/ckpt.pth'], 'layout': 'huang2022', 'file': 'ckpt.pth'},
        'hf_hub': {'repo_id': f"robust-resnets-test/{name or 'tiny'}", 'filename': 'model.safetensors'},
        'sha256': sha256, 'size': size, 'license': 'mit', 'published': published,
        'model_args': model_args or {},
    }
    out.update(overrides)
    return out


def write_manifest(folder: Path, entries: Dict[str, Dict[str, Any]], fname: str = 'fixtures.json') -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / fname
    path.write_text(json.dumps({'entries': entries}, indent=1))
    return path


def use_manifest(monkeypatch, folder: Path, entries: Dict[str, Dict[str, Any]]) -> None:
    """Points ROBUST_RESNETS_MANIFEST_DIR at a fixture manifest and registers its tags with timm."""
    from robust_resnets.weights import register_manifest

    write_manifest(folder, entries)
    monkeypatch.setenv('ROBUST_RESNETS_MANIFEST_DIR', str(folder))
    register_manifest()


def populate_hf_cache(cache: Path, repo_id: str, filename: str, data: bytes, etag: str, *,
                      commit: str = COMMIT) -> Path:
    """Lays a file out as huggingface_hub caches it: blobs/<etag>, refs/main, snapshots/<commit>/<file>
    (refs/main then names ``commit``: the latest upload)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'blobs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs').mkdir(exist_ok=True)
    (repo / 'snapshots' / commit).mkdir(parents=True, exist_ok=True)
    (repo / 'blobs' / etag).write_bytes(data)
    (repo / 'refs' / 'main').write_text(commit)
    link = repo / 'snapshots' / commit / filename
    link.symlink_to(Path('..') / '..' / 'blobs' / etag)
    return link


def weight_files(cache: Path) -> list:
    """Every weight file (blob or snapshot entry) under a Hugging Face cache folder."""
    return [p for p in cache.rglob('*') if ('blobs' in p.parts or 'snapshots' in p.parts) and not p.is_dir()]


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every norm layer non-trivial statistics and affine parameters, so mapping mistakes show in logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.copy_(torch.randn(m.out_features, generator=g) * 0.1)
    return model


def _act(name: str) -> nn.Module:
    return {'ReLU': nn.ReLU, 'SiLU': nn.SiLU}[name](inplace=True)


# --- 'huang2022': zhichao-lu/robust-residual-network PreActResNet (and RobustBench's re-export) ----------
class HuangBasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, act: str, **_: Any) -> None:
        super().__init__()
        self.act = _act(act)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, 0, bias=False))
        self.out_chs = planes

    def forward(self, x):
        pre = self.act(self.bn1(x))
        skip = self.shortcut(pre) if hasattr(self, 'shortcut') else x
        return self.conv2(self.act(self.bn2(self.conv1(pre)))) + skip


class HuangSE(nn.Module):
    def __init__(self, chs: int, reduction: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(chs, chs // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(chs // reduction, chs, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))[:, :, None, None]


class HuangRobustResBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, act: str, scales: int, base_width: int,
                 cardinality: int, se_reduction: int) -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 160))) * cardinality
        self.act = _act(act)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, width * scales, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width * scales)
        if scales == 1:
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
            self.bn3 = nn.BatchNorm2d(width)
        else:
            self.conv2 = nn.ModuleList([nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
                                        for _ in range(scales - 1)])
            self.bn3 = nn.ModuleList([nn.BatchNorm2d(width) for _ in range(scales - 1)])
        self.conv3 = nn.Conv2d(width * scales, planes * 4, 1, bias=False)
        self.se_bn = nn.BatchNorm2d(planes * 4)
        self.se = HuangSE(planes * 4, se_reduction)
        if stride > 1 or cin != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False))
        self.stride, self.scales, self.out_chs = stride, scales, planes * 4

    def forward(self, x):
        pre = self.act(self.bn1(x))
        skip = self.shortcut(pre) if hasattr(self, 'shortcut') else x
        out = self.act(self.bn2(self.conv1(x)))
        if self.scales == 1:
            out = self.act(self.bn3(self.conv2(out)))
        else:
            parts = torch.chunk(out, self.scales, 1)
            ys = []
            for s in range(self.scales - 1):
                inp = parts[s] if s == 0 or self.stride > 1 else parts[s] + ys[-1]
                ys.append(self.act(self.bn3[s](self.conv2[s](inp))))
            last = parts[-1]
            ys.append(last if self.stride == 1 else F.avg_pool2d(last, 3, self.stride, 1))
            out = torch.cat(ys, 1)
        out = self.conv3(out)
        return out + skip + self.se(self.se_bn(out))


class HuangStage(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.Sequential(*layers)

    def forward(self, x):
        return self.layer(x)


class HuangPreActResNet(nn.Module):
    """Keys: stem_conv, blocks.i.layer.j.{bn1, conv1, bn2, conv2[.k], bn3[.k], conv3, se_bn, se.fc.0/2,
    shortcut.0}, norm1, fc; optional mu/sigma buffers (RobustBench's pre_process)."""

    def __init__(self, depths, planes, block: str = 'basic', act: str = 'ReLU', num_classes: int = 10,
                 scales: int = 4, base_width: int = 10, cardinality: int = 4, se_reduction: int = 16,
                 pre_process: bool = False) -> None:
        super().__init__()
        if pre_process:
            self.register_buffer('mu', torch.tensor(CIFAR10_MEAN).view(3, 1, 1))
            self.register_buffer('sigma', torch.tensor(CIFAR10_STD).view(3, 1, 1))
        self.pre_process = pre_process
        self.stem_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cls = HuangBasicBlock if block == 'basic' else HuangRobustResBlock
        cin, stages = 16, []
        for i, (d, p) in enumerate(zip(depths, planes)):
            layers = []
            for j in range(d):
                b = cls(cin, p, (1, 2, 2)[i] if j == 0 else 1, act, scales=scales, base_width=base_width,
                        cardinality=cardinality, se_reduction=se_reduction)
                cin = b.out_chs
                layers.append(b)
            stages.append(HuangStage(layers))
        self.blocks = nn.ModuleList(stages)
        self.norm1 = nn.BatchNorm2d(cin)
        self.act1 = _act(act)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        if self.pre_process:
            x = (x - self.mu) / self.sigma
        x = self.stem_conv(x)
        for b in self.blocks:
            x = b(x)
        return self.fc(F.adaptive_avg_pool2d(self.act1(self.norm1(x)), 1).flatten(1))


# --- 'robustwrn': TRADES WideResNet (conv1, block1..3) or HanxunH RobustWRN (stem_conv, blocks.i) ---------
class TradesBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.equal else self.convShortcut(pre))


class TradesWideResNet(nn.Module):
    def __init__(self, depth: int = 10, widen: int = 2, num_classes: int = 10, robustwrn_names: bool = False):
        super().__init__()
        n = (depth - 4) // 6
        chs = [16, 16 * widen, 32 * widen, 64 * widen]
        self.robustwrn_names = robustwrn_names
        stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages = [HuangStage([TradesBlock(chs[i] if j == 0 else chs[i + 1], chs[i + 1], (1, 2, 2)[i] if j == 0 else 1)
                              for j in range(n)]) for i in range(3)]
        if robustwrn_names:
            self.stem_conv, self.blocks = stem, nn.ModuleList(stages)
        else:
            self.conv1, self.block1, self.block2, self.block3 = stem, *stages
        self.bn1 = nn.BatchNorm2d(chs[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(chs[3], num_classes)

    def forward(self, x):
        if self.robustwrn_names:
            x = self.stem_conv(x)
            for b in self.blocks:
                x = b(x)
        else:
            x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(self.relu(self.bn1(x)), 1).flatten(1))


# --- 'dm_wrn': RobustBench DMWideResNet (SCORE, Gowal et al.) --------------------------------------------
class DMBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin)
        self.relu_0 = nn.SiLU()
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(cout)
        self.relu_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if self.has_shortcut else None
        self.stride = stride

    def forward(self, x):
        pre = self.relu_0(self.batchnorm_0(x))
        v = F.pad(pre, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return out + (self.shortcut(pre) if self.has_shortcut else x)


class DMGroup(nn.Module):
    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.block = nn.Sequential(*blocks)

    def forward(self, x):
        return self.block(x)


class DMWideResNet(nn.Module):
    """Keys: init_conv, layer.i.block.j.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, batchnorm,
    logits; mean/std are non-persistent (not in the state dict)."""

    def __init__(self, depth: int = 10, width: int = 2, num_classes: int = 10, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(3, 1, 1), persistent=False)
        n = (depth - 4) // 6
        chs = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer = nn.Sequential(*[DMGroup([DMBlock(chs[i] if j == 0 else chs[i + 1], chs[i + 1],
                                                      (1, 2, 2)[i] if j == 0 else 1) for j in range(n)])
                                     for i in range(3)])
        self.batchnorm = nn.BatchNorm2d(chs[3])
        self.relu = nn.SiLU()
        self.logits = nn.Linear(chs[3], num_classes)

    def forward(self, x):
        x = self.layer(self.init_conv((x - self.mean) / self.std))
        return self.logits(F.adaptive_avg_pool2d(self.relu(self.batchnorm(x)), 1).flatten(1))


def ema_wrapped(model: nn.Module, *, key: str = 'model_state_dict', ddp: bool = True) -> Dict[str, Any]:
    """The authors' EMA checkpoint: the averaged model under ``key``, the raw one (different weights) beside
    it, optimiser state, and DataParallel's ``module.`` prefix."""
    prefix = 'module.' if ddp else ''
    raw = copy.deepcopy(model)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(torch.randn_like(p))
    return {
        key: {prefix + k: v for k, v in model.state_dict().items()},
        'unaveraged_model_state_dict': {prefix + k: v for k, v in raw.state_dict().items()},
        'optimizer_state_dict': {'state': {}, 'param_groups': [{'lr': 0.1, 'momentum': 0.9, 'params': [0, 1]}]},
        'epoch': 99,
    }
