"""RobustScaling (Huang et al. 2022): compound depth/width scaling of three-stage pre-activation ResNets.

The rule: total depth to total widening factor 7 : 3, stage depths 2 : 2 : 1 and stage widening
factors 2 : 2.5 : 1 (channels ``[16, 16 W1, 32 W2, 64 W3]``), grown until the network spends the
MACs budget. :func:`scale_by_depth` and :func:`scale_by_width` are the independent scalings of the
paper's Table 2.

The released RobustResNet-A1..A4 were picked by the authors on their scaling grid: all four obey the
ratios up to one unit per stage, but A2..A4 are not the splits that nearest-integer rounding gives
(e.g. A4 widths (10, 14, 6) where rounding 30 * (2, 2.5, 1) / 5.5 gives (11, 14, 5)). So
:func:`robust_scaling` returns a published configuration when one obeys the rule within that
tolerance and lands within 10% of the budget, and the rule's own split otherwise; ``source`` says
which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Sequence, Tuple

import torch

__all__ = ['ScaledConfig', 'robust_scaling', 'scale_by_depth', 'scale_by_width', 'network_macs', 'split_by_ratio']

DEPTH_RATIO = (2.0, 2.0, 1.0)
WIDTH_RATIO = (2.0, 2.5, 1.0)
DEPTH_TO_WIDTH = 7.0 / 3.0
BASE_CHANNELS = (16, 32, 64)
STRIDES = (1, 2, 2)
#: How far (relative) a published configuration may sit from the budget and still be preferred.
PUBLISHED_MACS_TOLERANCE = 0.10
#: How far (relative) a published configuration's total depth : total width may sit from 7 : 3.
PUBLISHED_RATIO_TOLERANCE = 0.10


@dataclass(frozen=True)
class ScaledConfig:
    """A scaled network: per-stage depths and widening factors, its MACs, and where it came from."""

    depths: Tuple[int, int, int]
    widths: Tuple[int, int, int]
    macs: int
    source: str  # 'rule' or 'published:<name>'

    @property
    def channels(self) -> Tuple[int, int, int, int]:
        """Channel config in the authors' form ``[16, 16 W1, 32 W2, 64 W3]``."""
        return (16,) + tuple(b * w for b, w in zip(BASE_CHANNELS, self.widths))

    def model_kwargs(self) -> Dict[str, Tuple[int, int, int]]:
        """Keyword arguments for ``timm.create_model('preact_resnet', ...)``."""
        return {'depths': self.depths, 'widths': self.widths}


def split_by_ratio(total: int, ratio: Sequence[float]) -> Tuple[int, ...]:
    """Splits an integer total into integer parts proportional to ``ratio`` (largest remainder, each >= 1)."""
    if total < len(ratio):
        raise ValueError(f'Cannot split {total} into {len(ratio)} stages of at least one unit each.')
    s = float(sum(ratio))
    ideal = [total * r / s for r in ratio]
    parts = [max(1, math.floor(v)) for v in ideal]
    order = sorted(range(len(ratio)), key=lambda i: (ideal[i] - math.floor(ideal[i]), -i), reverse=True)
    i = 0
    while sum(parts) < total:
        parts[order[i % len(order)]] += 1
        i += 1
    while sum(parts) > total:
        j = max(range(len(parts)), key=lambda k: parts[k] - ideal[k])
        parts[j] -= 1
    return tuple(parts)


@lru_cache(maxsize=None)
def _block_macs(block_type: str, in_chs: int, planes: int, stride: int, hw: int, kwargs: Tuple) -> int:
    from .complexity import count_macs
    from .models.preact_resnet import _block_cls

    with torch.device('meta'):
        block = _block_cls(block_type)(in_chs, planes, stride, **dict(kwargs))
    return count_macs(block, input_size=(in_chs, hw, hw))


def network_macs(
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        block_type: str = 'robust_res_block',
        num_classes: int = 10,
        image_size: int = 32,
        **block_kwargs,
) -> int:
    """MACs of ``preact_resnet(depths, widths, block_types=block_type)`` at ``image_size``, summed per block.

    Equal to :func:`robust_resnets.complexity.count_macs` of the whole network (tested), but cached per
    distinct block so that scanning thousands of configurations is fast.
    """
    from .models.preact_resnet import ROBUST_RES_BLOCK_ARGS

    if block_type == 'robust_res_block':
        defaults = {k: v for k, v in ROBUST_RES_BLOCK_ARGS.items() if k != 'block_types'}
        block_kwargs = {**defaults, **block_kwargs}
    key = tuple(sorted(block_kwargs.items()))
    expansion = 4 if block_type == 'robust_res_block' else 1
    hw = image_size
    macs = 3 * 16 * 9 * hw * hw  # stem conv
    in_chs = 16
    for d, w, base, stride in zip(depths, widths, BASE_CHANNELS, STRIDES):
        planes = int(round(base * w))
        for i in range(int(d)):
            s = stride if i == 0 else 1
            macs += _block_macs(block_type, in_chs, planes, s, hw, key)
            hw = (hw - 1) // s + 1
            in_chs = planes * expansion
    # final norm, global average pool, classifier
    return macs + in_chs * hw * hw + in_chs + in_chs * num_classes


def _closest(candidates, target_macs: float) -> ScaledConfig:
    return min(candidates, key=lambda c: abs(math.log(c.macs / target_macs)))


def _rule_candidates(target_macs: float, block_type: str, depth_ratio, width_ratio, depth_to_width,
                     **block_kwargs):
    out = []
    total_depth = len(depth_ratio)
    while True:
        ideal_width = total_depth / depth_to_width
        for total_width in sorted({max(len(width_ratio), math.floor(ideal_width)),
                                   max(len(width_ratio), math.ceil(ideal_width))}):
            d = split_by_ratio(total_depth, depth_ratio)
            w = split_by_ratio(total_width, width_ratio)
            macs = network_macs(d, w, block_type=block_type, **block_kwargs)
            out.append(ScaledConfig(d, w, macs, 'rule'))
        if out and min(c.macs for c in out[-2:]) > 2 * target_macs:
            return out
        total_depth += 1


def robust_scaling(
        target_macs: float,
        *,
        block_type: str = 'robust_res_block',
        depth_ratio: Sequence[float] = DEPTH_RATIO,
        width_ratio: Sequence[float] = WIDTH_RATIO,
        depth_to_width: float = DEPTH_TO_WIDTH,
        prefer_published: bool = True,
        **block_kwargs,
) -> ScaledConfig:
    """Compound-scales depth and width to a MACs budget with the RobustScaling rule.

    Args:
        target_macs: Budget in MACs at 32x32 (e.g. ``5e9``).
        block_type: 'robust_res_block' (RobustResNets) or 'basic' (WRN-A*).
        depth_ratio: Stage depth ratio.
        width_ratio: Stage widening-factor ratio.
        depth_to_width: Total depth over total widening factor.
        prefer_published: Return a released A-configuration when it obeys the rule (within one unit per
            stage, 10% on the depth:width ratio) and costs within 10% of the budget.
        **block_kwargs: RobustResBlock hyper-parameters (scales, base_width, cardinality, se_reduction).

    Returns:
        The scaled configuration; ``robust_scaling(5e9)`` is RobustResNet-A1.
    """
    _check_budget(target_macs)
    if prefer_published:
        published = _published_candidates(target_macs, block_type, depth_ratio, width_ratio, depth_to_width,
                                          **block_kwargs)
        if published:
            return _closest(published, target_macs)
    candidates = _rule_candidates(target_macs, block_type, depth_ratio, width_ratio, depth_to_width,
                                  **block_kwargs)
    return _closest(candidates, target_macs)


def _obeys_rule(depths, widths, depth_ratio, width_ratio, depth_to_width) -> bool:
    ratio = sum(depths) / sum(widths)
    if abs(ratio / depth_to_width - 1) > PUBLISHED_RATIO_TOLERANCE:
        return False
    for parts, r in ((depths, depth_ratio), (widths, width_ratio)):
        ideal = [sum(parts) * x / sum(r) for x in r]
        if any(abs(p - i) >= 1 for p, i in zip(parts, ideal)):
            return False
    return True


def _published_candidates(target_macs, block_type, depth_ratio, width_ratio, depth_to_width, **block_kwargs):
    from .models.preact_resnet import ROBUST_SCALING_CONFIGS

    out = []
    for name, cfg in ROBUST_SCALING_CONFIGS.items():
        d, w = tuple(cfg['depths']), tuple(cfg['widths'])
        if not _obeys_rule(d, w, depth_ratio, width_ratio, depth_to_width):
            continue
        macs = network_macs(d, w, block_type=block_type, **block_kwargs)
        if abs(macs / target_macs - 1) <= PUBLISHED_MACS_TOLERANCE:
            out.append(ScaledConfig(d, w, macs, f'published:{name.upper()}'))
    return out


def _check_budget(target_macs: float) -> None:
    if not target_macs > 0:
        raise ValueError(f'target_macs must be a positive MAC count such as 5e9, got {target_macs!r}.')


def _grow_one_dimension(target_macs: float, make_config, ratio: Sequence[float]) -> ScaledConfig:
    """Grows one dimension's total from one unit per stage until twice the budget; returns the closest."""
    candidates = []
    total = len(ratio)
    while not candidates or candidates[-1].macs <= 2 * target_macs:
        candidates.append(make_config(split_by_ratio(total, ratio)))
        total += 1
    return _closest(candidates, target_macs)


def scale_by_depth(
        target_macs: float,
        *,
        widths: Sequence[int] = (10, 10, 10),
        depth_ratio: Sequence[float] = DEPTH_RATIO,
        block_type: str = 'basic',
        **block_kwargs,
) -> ScaledConfig:
    """Independent depth scaling (Table 2 'D' rows): fixed widths, total depth grown at ``depth_ratio``."""
    _check_budget(target_macs)
    widths = tuple(int(w) for w in widths)
    return _grow_one_dimension(target_macs, lambda d: ScaledConfig(
        d, widths, network_macs(d, widths, block_type=block_type, **block_kwargs), 'rule'), depth_ratio)


def scale_by_width(
        target_macs: float,
        *,
        depths: Sequence[int] = (4, 4, 4),
        width_ratio: Sequence[float] = WIDTH_RATIO,
        block_type: str = 'basic',
        **block_kwargs,
) -> ScaledConfig:
    """Independent width scaling (Table 2 'W' rows): fixed depths, total widening factor grown at ``width_ratio``."""
    _check_budget(target_macs)
    depths = tuple(int(d) for d in depths)
    return _grow_one_dimension(target_macs, lambda w: ScaledConfig(
        depths, w, network_macs(depths, w, block_type=block_type, **block_kwargs), 'rule'), width_ratio)
