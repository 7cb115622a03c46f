"""Our CIFAR models against RobustBench's own architecture classes (robustbench 1.1.1, the optional extra).

``tests/test_preact_resnet.py`` checks the original layouts against functional re-implementations that
run everywhere; here, where robustbench is installed, the same layouts come from the classes RobustBench
loads the released checkpoints into: Huang et al.'s ``PreActResNet`` (basic blocks, the WRN-A4 layout),
Huang et al. 2021's ``RobustWideResNet`` and DeepMind's ``DMWideResNet``. Small configurations of each
are converted with :func:`checkpoint_filter_fn` and must give the same logits. (RobustBench's copy of
Huang et al.'s file names a ``RobustResBlock`` it does not define, so the RobustResBlock is checked
against the authors' layout in ``tests/test_preact_resnet.py`` only.)
"""
import importlib.util

import pytest
import torch
import torch.nn as nn

from _training_fixtures import one_thread  # noqa: F401

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec('robustbench') is None,
                       reason='robustbench is not installed (optional extra: pip install robust-resnets[robustbench])'),
    pytest.mark.usefixtures('one_thread'),
]
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def _architectures():
    from robust_resnets.evaluation.robustbench_adapter import install
    install()  # robustbench 1.1.1 imports pkg_resources, gone from recent setuptools
    from robustbench.model_zoo.architectures import dm_wide_resnet, robust_resnet, robust_wide_resnet
    return robust_resnet, robust_wide_resnet, dm_wide_resnet


def _randomised(model: nn.Module) -> nn.Module:
    """Random weights and batch-norm statistics (fresh ones would hide a swapped mean/var or scale)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _assert_same_logits(theirs: nn.Module, ours: nn.Module, layout: str) -> None:
    from robust_resnets.models.preact_resnet import checkpoint_filter_fn, detect_layout
    sd = theirs.state_dict()
    assert detect_layout(sd) == layout
    ours.load_state_dict(checkpoint_filter_fn(sd, ours), strict=True)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-5)


def test_huang2022_preact_resnet_basic_blocks():
    import timm

    import robust_resnets  # noqa: F401
    robust_resnet, _, _ = _architectures()
    channels = (80, 224, 192)  # WRN-A1's stage widths (5, 7, 3) x (16, 32, 64)
    theirs = robust_resnet.PreActResNet(
        num_classes=10, channel_configs=[16, *channels], depth_configs=[2, 1, 1], stride_config=[1, 2, 2],
        block_types=['basic_block'] * 3, activations=['ReLU'] * 3, normalizations=['BatchNorm'] * 3)
    ours = timm.create_model('wrn_a1', depths=(2, 1, 1))
    _assert_same_logits(_randomised(theirs), ours, 'huang2022')


def test_robustbench_wrn_a4_layout_with_swish_and_standardisation():
    import timm

    import robust_resnets  # noqa: F401
    robust_resnet, _, _ = _architectures()
    # get_model('WRN-A4') at reduced depth: SiLU, basic blocks, CIFAR-10 mu/sigma inside (pre_process)
    theirs = robust_resnet.PreActResNet(
        num_classes=10, channel_configs=[16, 160, 448, 384], depth_configs=[1, 2, 1], stride_config=[1, 2, 2],
        block_types=['basic_block'] * 3, activations=['SiLU'] * 3, normalizations=['BatchNorm'] * 3,
        use_init=False, cardinality=None, base_width=None, scales=None, se_reduction=None, pre_process=True)
    ours = timm.create_model('wrn_a4', depths=(1, 2, 1), activations='SiLU', input_mean=CIFAR10_MEAN,
                             input_std=CIFAR10_STD)
    _assert_same_logits(_randomised(theirs), ours, 'huang2022')


def test_huang2021_robust_wide_resnet():
    import timm

    import robust_resnets  # noqa: F401
    _, robust_wide_resnet, _ = _architectures()
    # Huang2021Exploring is channel_configs [16, 320, 640, 512], depth_configs [5, 5, 5]: here at depth 1-2
    theirs = robust_wide_resnet.RobustWideResNet(num_classes=10, channel_configs=[16, 64, 128, 96],
                                                 depth_configs=[2, 1, 1])
    ours = timm.create_model('wrn_34_r', depths=(2, 1, 1), channels=(64, 128, 96))
    _assert_same_logits(_randomised(theirs), ours, 'robustwrn')


def test_deepmind_wide_resnet_with_swish():
    import timm

    import robust_resnets  # noqa: F401
    _, _, dm_wide_resnet = _architectures()
    theirs = dm_wide_resnet.DMWideResNet(num_classes=10, depth=16, width=2, activation_fn=dm_wide_resnet.Swish,
                                         mean=CIFAR10_MEAN, std=CIFAR10_STD)
    ours = timm.create_model('wrn_28_10_swish', depths=(2, 2, 2), widths=(2, 2, 2))
    _assert_same_logits(_randomised(theirs), ours, 'dm_wrn')
