"""RobustScaling: the compound rule, its published A1..A4 configurations, and the independent scalings."""
from __future__ import annotations

import pytest

from robust_resnets import robust_scaling, scale_by_depth, scale_by_width
from robust_resnets.models.preact_resnet import ROBUST_SCALING_CONFIGS
from robust_resnets.scaling import network_macs, split_by_ratio


@pytest.mark.parametrize('budget,name', [(5e9, 'a1'), (10e9, 'a2'), (20e9, 'a3'), (40e9, 'a4')])
@pytest.mark.parametrize('block', ['robust_res_block', 'basic'])
def test_budgets_give_the_published_configurations(budget, name, block):
    cfg = robust_scaling(budget, block_type=block)
    assert (cfg.depths, cfg.widths) == (ROBUST_SCALING_CONFIGS[name]['depths'], ROBUST_SCALING_CONFIGS[name]['widths'])
    assert cfg.source == f'published:{name.upper()}'
    assert abs(cfg.macs / budget - 1) < 0.1


def test_rule_alone_gives_a1_and_obeys_the_ratios():
    a1 = robust_scaling(5e9, prefer_published=False)
    assert (a1.depths, a1.widths, a1.source) == ((14, 14, 7), (5, 7, 3), 'rule')
    for budget in (2e9, 10e9, 20e9):
        cfg = robust_scaling(budget, prefer_published=False)
        d, w = cfg.depths, cfg.widths
        assert abs(sum(d) / sum(w) - 7 / 3) < 0.25
        assert d[0] == pytest.approx(2 * d[2], abs=1.01) and d[1] == pytest.approx(2 * d[2], abs=1.01)
        assert w[1] == pytest.approx(2.5 * sum(w) / 5.5, abs=1) and w[2] == pytest.approx(sum(w) / 5.5, abs=1)


def test_rule_tracks_the_budget():
    small, large = robust_scaling(1e9), robust_scaling(8e9)
    assert small.macs < large.macs
    assert abs(small.macs / 1e9 - 1) < 0.2
    assert small.source == 'rule'
    assert small.channels[0] == 16 and small.channels[1] == 16 * small.widths[0]


def test_a0_is_the_rule_at_one_gmac_and_wrn_22_5_matches_its_macs():
    from robust_resnets.complexity import count_macs, create_for_counting
    from robust_resnets.models.preact_resnet import COMPACT_SCALING_CONFIGS
    cfg = robust_scaling(1e9)
    assert (cfg.depths, cfg.widths, cfg.source) == (COMPACT_SCALING_CONFIGS['a0']['depths'],
                                                    COMPACT_SCALING_CONFIGS['a0']['widths'], 'rule')
    a0 = count_macs(create_for_counting('robust_resnet_a0'), input_size=(3, 32, 32))
    wrn = count_macs(create_for_counting('wrn_22_5'), input_size=(3, 32, 32))
    assert a0 == cfg.macs and abs(wrn / a0 - 1) < 0.01


def test_independent_scalings():
    d = scale_by_depth(5e9, widths=(10, 10, 10))
    assert d.widths == (10, 10, 10) and abs(d.macs / 5e9 - 1) < 0.1
    w = scale_by_width(5e9, depths=(4, 4, 4))
    assert w.depths == (4, 4, 4) and abs(w.macs / 5e9 - 1) < 0.1
    assert network_macs(w.depths, w.widths, block_type='basic') == w.macs


def test_split_by_ratio():
    assert split_by_ratio(35, (2, 2, 1)) == (14, 14, 7)
    assert split_by_ratio(42, (2, 2, 1)) == (17, 17, 8)
    assert split_by_ratio(15, (2, 2.5, 1)) == (5, 7, 3)
    assert sum(split_by_ratio(31, (2, 2.5, 1))) == 31
    with pytest.raises(ValueError, match='at least one unit'):
        split_by_ratio(2, (2, 2, 1))


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match='positive MAC count'):
        robust_scaling(0)
