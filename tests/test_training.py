"""The adversarial-training package: config handling, the attack inside training, exact resume, DDP, export."""
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from robust_resnets.training import config as config_mod
from robust_resnets.training.config import ConfigError, config_from_dict, config_to_dict, load_config
from robust_resnets.training.data import BatchPlan, augment

from _training_fixtures import one_thread, random_cifar_data as _data, record_lrs  # noqa: F401

DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
TINY = {'name': 'preact_resnet', 'kwargs': {'depths': [1, 1, 1], 'widths': [1, 1, 1]}}
EPS = 8 / 255
pytestmark = pytest.mark.usefixtures('one_thread')


def _cfg(**sections):
    values = {'model': TINY, 'attack': {'steps': 2}, 'eval': {'pgd_steps': 1, 'batch_size': 16},
              'run': {'epochs': 2, 'batch_size': 16, 'progress': False}}
    for name, section in sections.items():
        values[name] = {**values.get(name, {}), **section}
    return config_from_dict(values)


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path))




# --- config ------------------------------------------------------------------------------------------
def test_config_rejects_bad_keys_types_and_values(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown config key 'optim.lrr'. Did you mean 'optim.lr'\?"):
        config_from_dict({'optim': {'lrr': 0.1}})
    with pytest.raises(ConfigError, match="Unknown config key 'optimizer'"):
        config_from_dict({'optimizer': {}})
    with pytest.raises(ConfigError, match="'run.epochs' must be an integer"):
        config_from_dict({'run': {'epochs': 'ten'}})
    with pytest.raises(ConfigError, match="'schedule.name' is 'linear'; use one of"):
        config_from_dict({'schedule': {'name': 'linear'}})
    with pytest.raises(ConfigError, match="'objective.name'.*Unknown training objective"):
        config_from_dict({'objective': {'name': 'tradez'}})
    with pytest.raises(ConfigError, match="needs 'data.generated'"):
        config_from_dict({'data': {'generated_fraction': 0.5}})
    with pytest.raises(ConfigError, match=r"'data.generated' \(ddpm.npz\) is set but 'data.generated_fraction' is 0"):
        config_from_dict({'data': {'generated': 'ddpm.npz'}})
    with pytest.raises(ConfigError, match=r"objective 'trades' with 'attack.eps' 0 attacks nothing: set attack.eps"):
        config_from_dict({'objective': {'name': 'trades'}, 'attack': {'eps': 0}})
    assert config_from_dict({'objective': {'name': 'clean'}, 'attack': {'eps': 0}}).attack.eps == 0
    with pytest.raises(ConfigError, match=r"'model.kwargs.normalizations:GroupNorm' is null, which timm ignores .* "
                                          r"Did you mean 'normalizations: GroupNorm'\?"):
        load_config('quick_cifar10', overrides=['model.kwargs={depths: [1,1,1], normalizations:GroupNorm}'])
    with pytest.raises(ConfigError, match=r"'mart' does not use objective.label_smoothing \(it takes objective.beta\)"):
        config_from_dict({'objective': {'name': 'mart', 'label_smoothing': 0.1}})
    with pytest.raises(ConfigError, match="'pgd_at' does not use objective.beta, objective.clip_value"):
        config_from_dict({'objective': {'name': 'pgd_at', 'beta': 3.0, 'clip_value': 0.5}})
    with pytest.raises(ConfigError, match="not key=value"):
        config_mod.apply_overrides({}, ['optim.lr'])
    with pytest.raises(ConfigError, match="Unknown config key 'run.epoch'. Did you mean 'run.epochs'"):
        config_mod.apply_overrides({}, ['run.epoch=3'])
    with pytest.raises(FileNotFoundError, match='neither a file nor a shipped recipe'):
        load_config(tmp_path / 'missing.yaml')


def test_config_files_inherit_and_take_overrides(tmp_path):
    (tmp_path / 'base.yaml').write_text(yaml.safe_dump({'optim': {'lr': 0.3, 'nesterov': True}, 'model': TINY}))
    (tmp_path / 'child.yaml').write_text(yaml.safe_dump({'base': 'base.yaml', 'optim': {'lr': 0.2}}))
    cfg = load_config(tmp_path / 'child.yaml', overrides=['run.epochs=3', 'attack.eps=0.0156',
                                                          'model.kwargs.drop_rate=0.1', 'optim.grad_clip=null'])
    assert (cfg.optim.lr, cfg.optim.nesterov, cfg.run.epochs, cfg.attack.eps) == (0.2, True, 3, 0.0156)
    assert cfg.model.kwargs == {'depths': [1, 1, 1], 'widths': [1, 1, 1], 'drop_rate': 0.1}
    assert cfg.optim.grad_clip is None
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # exponents without a decimal point, which YAML 1.1 reads as strings, are numbers (overrides and files)
    (tmp_path / 'exp.yaml').write_text('base: base.yaml\noptim:\n  lr: 1e-3\n')
    cfg = load_config(tmp_path / 'exp.yaml', overrides=['optim.weight_decay=5E-4', 'run.epochs=2e1',
                                                         'model.kwargs.drop_path_rate=1e-2'])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.run.epochs) == (1e-3, 5e-4, 20)
    assert cfg.model.kwargs['drop_path_rate'] == 1e-2
    with pytest.raises(ConfigError, match="'optim.lr' must be a number, got '1e-3x'"):
        load_config(tmp_path / 'exp.yaml', overrides=['optim.lr=1e-3x'])
    # another architecture with the recipe's model arguments left in place is refused, not built silently
    with pytest.raises(ConfigError, match=r"keeps the recipe's model.kwargs .* Add --set 'model.kwargs=\{\}'"):
        load_config(tmp_path / 'child.yaml', overrides=['model.name=robust_resnet_a0'])
    assert load_config(tmp_path / 'child.yaml', overrides=['model.name=robust_resnet_a0', 'model.kwargs={}']) \
        .model.kwargs == {}


def test_a_file_may_build_on_a_shipped_recipe_and_its_description_names_its_changes(tmp_path, monkeypatch):
    recipe = load_config('quick_cifar10')
    mine = tmp_path / 'mine.yaml'
    mine.write_text('base: quick_cifar10\noptim:\n  lr: 0.05\ndata:\n  root: /data\nattack:\n  eps: 4/255\n')
    cfg = load_config(mine)
    assert (cfg.optim.lr, cfg.data.root, cfg.attack.eps, cfg.model) == (0.05, '/data', 4 / 255, recipe.model)
    # the base's description would pass the run off as the recipe's; a run-control key (data.root) changes nothing
    assert cfg.description == f'{recipe.description} (with changes from mine.yaml: optim.lr, attack.eps)'
    # values the recipe has already (a default written out, a radius as a decimal) change nothing
    mine.write_text(f'base: quick_cifar10\ndata:\n  root: /data\noptim:\n  lr: {recipe.optim.lr}\nrun:\n  seed: 0\n'
                    f'attack:\n  eps: {recipe.attack.eps!r}\n')
    assert load_config(mine).description == recipe.description
    mine.write_text('base: quick_cifar10\ndescription: my run\noptim:\n  lr: 0.05\n')
    assert load_config(mine).description == 'my run'
    mine.write_text('base: quick_cifar10\nmodel:\n  name: robust_resnet_a0\n  kwargs: {}\n')
    assert load_config(mine).description == f'{recipe.description} (with changes from mine.yaml: model.name, ' \
                                             f'model.kwargs)'
    # a base path that is not beside the file is not looked for in the working directory
    (tmp_path / 'cwd' / 'sub').mkdir(parents=True)
    (tmp_path / 'cwd' / 'sub' / 'other.yaml').write_text('optim:\n  lr: 0.5\n')
    (tmp_path / 'cwd' / 'quick_cifar10.yaml').write_text('optim:\n  lr: 0.5\n')
    monkeypatch.chdir(tmp_path / 'cwd')
    mine.write_text('base: sub/other.yaml\n')
    with pytest.raises(FileNotFoundError, match="names base 'sub/other.yaml'"):
        load_config(mine)
    mine.write_text('base: quick_cifar10.yaml\n')  # the shipped one, not the working directory's
    assert load_config(mine).optim.lr == recipe.optim.lr
    mine.write_text('base: quick_cifar100\n')
    with pytest.raises(FileNotFoundError, match=r"names base 'quick_cifar100', but .* does not exist and no shipped "
                                                r"recipe has that name. Did you mean 'quick_cifar10'\? Shipped recipes: "
                                                r"quick_cifar10, rrn_a1_advanced"):
        load_config(mine)
    for empty in ('base:\n', 'base: [quick_cifar10]\n'):
        mine.write_text(empty + 'run:\n  epochs: 1\n')
        with pytest.raises(ConfigError, match=r"has 'base: .*'; give one file .* or shipped recipe name"):
            load_config(mine)
    mine.write_text('bse: quick_cifar10\n')
    with pytest.raises(ConfigError, match=r"Unknown config key 'bse'. Did you mean 'base'\?"):
        load_config(mine)
    # another architecture with the base's model arguments is refused, as with --set (the shipped recipes that
    # change model.name restate their arguments)
    mine.write_text('base: quick_cifar10\nmodel:\n  name: robust_resnet_a0\n')
    with pytest.raises(ConfigError, match=r"'.*mine.yaml' sets model.name: robust_resnet_a0 but keeps its base's "
                                          r"model.kwargs .* Give its model: a 'kwargs: \{\}'"):
        load_config(mine)


def test_radii_take_fractions_and_a_linf_radius_above_one_is_refused(tmp_path):
    cfg = load_config('quick_cifar10', overrides=['attack.eps=8/255', 'attack.step_size=2/255',
                                                  'eval.pgd_step_size=1/255', 'attack.init_std=0.5/255'])
    assert (cfg.attack.eps, cfg.attack.step_size, cfg.eval.pgd_step_size) == (8 / 255, 2 / 255, 1 / 255)
    assert cfg.attack.init_std == 0.5 / 255 and load_config('quick_cifar10').attack.init_std is None
    (tmp_path / 'r.yaml').write_text('base: ' + str(config_mod.resolve_config_path('quick_cifar10')) +
                                     '\nattack:\n  eps: 4/255\n  step_size: 1/255\n')
    cfg = load_config(tmp_path / 'r.yaml')
    assert (cfg.attack.eps, cfg.attack.step_size) == (4 / 255, 1 / 255)
    assert config_from_dict(config_to_dict(cfg)) == cfg  # recorded as numbers
    with pytest.raises(ConfigError, match=r"attack.eps=8 is larger than the whole \[0, 1\] pixel range; .*"
                                          r"did you mean attack.eps=8/255\?"):
        load_config('quick_cifar10', overrides=['attack.eps=8'])
    with pytest.raises(ConfigError, match=r"attack.step_size=2 is larger .* did you mean attack.step_size=2/255\?"):
        load_config('quick_cifar10', overrides=['attack.step_size=2'])
    with pytest.raises(ConfigError, match=r"eval.pgd_step_size=2 is larger .* did you mean eval.pgd_step_size=2/255\?"):
        load_config('quick_cifar10', overrides=['eval.pgd_step_size=2'])
    with pytest.raises(ConfigError, match=r"attack.init_std=2 is larger .* did you mean attack.init_std=2/255\?"):
        load_config('quick_cifar10', overrides=['attack.init_std=2'])
    with pytest.raises(ConfigError, match="'attack.init_std' must be a number or a fraction such as 8/255, got '2/x'"):
        load_config('quick_cifar10', overrides=['attack.init_std=2/x'])
    with pytest.raises(ConfigError, match="'attack.eps' must be a number or a fraction such as 8/255, got '8/x'"):
        load_config('quick_cifar10', overrides=['attack.eps=8/x'])
    with pytest.raises(ConfigError, match="'optim.lr' must be a number"):  # fractions are for the radii only
        load_config('quick_cifar10', overrides=['optim.lr=1/10'])
    # L2 radii are not bounded by the pixel range
    assert load_config('quick_cifar10', overrides=['attack.norm=L2', 'attack.eps=3', 'attack.step_size=1.5']) \
        .attack.eps == 3.0


def test_overrides_are_recorded_in_the_description(tmp_path):
    recipe = load_config('quick_cifar10').description
    assert recipe == 'Quick PGD-AT WRN-16-4, CIFAR-10'
    cfg = load_config('quick_cifar10', overrides=['model.name=robust_resnet_a0', 'model.kwargs={}',
                                                  'data.root=/data', 'run.max_steps=5'])
    assert cfg.description == f'{recipe} (with overrides model.name=robust_resnet_a0, model.kwargs={{}})'
    # run-control keys change nothing the recipe trains; a description of one's own is kept as given
    assert load_config('quick_cifar10', overrides=['data.root=/data', 'run.progress=false']).description == recipe
    assert load_config('quick_cifar10', overrides=['model.name=robust_resnet_a0', 'model.kwargs={}',
                                                   'description=A0 quick']).description == 'A0 quick'
    # an override that changes no value is not listed: the recipe's own eps, or a resumed run's saved config
    eps = load_config('quick_cifar10').attack.eps
    assert load_config('quick_cifar10', overrides=[f'attack.eps={eps!r}']).description == recipe
    saved = tmp_path / 'train_config.yaml'
    saved.write_text(yaml.safe_dump(config_mod.config_to_dict(cfg)))
    again = load_config(str(saved), overrides=['model.name=robust_resnet_a0', 'model.kwargs={}'])
    assert again.description == cfg.description


def test_shipped_recipes_load_and_match_the_papers():
    names = config_mod.list_builtin_configs()
    for a in range(1, 5):
        for o in ('trades', 'sat', 'mart', 'advanced'):
            assert f'rrn_a{a}_{o}' in names
    assert {'score_wrn_28_10', 'score_wrn_70_16', 'quick_cifar10'} <= set(names)
    for name in names:
        load_config(name)
    for name, expected in _paper_recipes(names):
        cfg = load_config(name)
        wrong = {key: (_dotted(cfg, key), value) for key, value in expected.items()
                 if not (math.isclose(_dotted(cfg, key), value, rel_tol=1e-9) if isinstance(value, float)
                         else _dotted(cfg, key) == value)}
        assert not wrong, f'{name}: (ours, paper) {wrong}'


def _dotted(cfg, key):
    for part in key.split('.'):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return list(cfg) if isinstance(cfg, tuple) else cfg


def _paper_recipes(names):
    """(recipe, {dotted field: the paper's value}), transcribed from the authors' code and READMEs: Huang et al.
    2022 (configs/, main_dist.py, core/losses; README "advanced"), SCORE (train-wa.py and its parser) and
    Singh et al. 2023 (main.py, parserr.py, run_train.sh, README table of epochs)."""
    huang = {'run.epochs': 100, 'run.batch_size': 128, 'optim.lr': 0.1, 'optim.momentum': 0.9, 'optim.nesterov': False,
             'optim.weight_decay': 2e-4, 'optim.no_weight_decay': 'none', 'optim.grad_clip': 5.0,
             'schedule.name': 'multistep', 'schedule.milestones': [75, 90], 'schedule.gamma': 0.1,
             'ema.enabled': False, 'attack.eps': 8 / 255, 'attack.step_size': 2 / 255, 'attack.steps': 10,
             'attack.random_start': True, 'objective.attack_bn': 'eval', 'objective.bn_update': 'all',
             'objective.label_smoothing': 0.0, 'eval.pgd_steps': 20, 'eval.pgd_step_size': 0.8 / 255,
             'data.dataset': 'cifar10', 'data.rotation': 0}
    objectives = {'trades': {'objective.name': 'trades', 'objective.beta': 6.0, 'attack.init_std': 0.001},
                  'sat': {'objective.name': 'pgd_at', 'attack.init_std': 2 / 255},
                  'mart': {'objective.name': 'mart', 'objective.beta': 6.0, 'attack.init_std': 2 / 255}}
    wa = {'optim.momentum': 0.9, 'optim.nesterov': True, 'optim.weight_decay': 5e-4, 'optim.no_weight_decay': 'norm',
          'optim.grad_clip': None, 'schedule.name': 'onecycle', 'schedule.pct_start': 0.025, 'ema.enabled': True,
          'ema.decay': 0.995, 'ema.warmup_epochs': 10, 'run.epochs': 400, 'run.bn_momentum': 0.01,
          'data.generated_fraction': 0.7, 'attack.eps': 8 / 255, 'attack.step_size': 2 / 255, 'attack.steps': 10,
          'objective.attack_bn': 'train'}
    advanced = {**wa, 'objective.name': 'trades', 'objective.beta': 6.0, 'objective.label_smoothing': 0.1,
                'objective.bn_update': 'adversarial', 'optim.lr': 0.4, 'run.batch_size': 1024,
                'model.kwargs': {'activations': 'SiLU'}}
    score = {**wa, 'objective.name': 'score', 'objective.beta': 3.0, 'objective.label_smoothing': 0.0,
             'objective.clip_value': 0.0, 'objective.bn_update': 'all'}
    singh = {'optim.name': 'adamw', 'optim.lr': 1e-3, 'optim.betas': [0.9, 0.95], 'optim.weight_decay': 0.05,
             'schedule.name': 'cosine', 'schedule.warmup_start': 1e-4, 'schedule.min_lr': 5e-6, 'ema.enabled': True,
             'ema.decay': 0.9999, 'ema.warmup_epochs': 0, 'attack.name': 'apgd', 'attack.eps': 4 / 255,
             'attack.steps': 2, 'attack.random_start': False, 'objective.name': 'pgd_at', 'objective.attack_bn': 'eval',
             'objective.label_smoothing': 0.1, 'data.mixup_alpha': 0.8, 'data.cutmix_alpha': 1.0,
             'data.mixup_prob': 1.0, 'data.mixup_switch_prob': 0.5, 'data.randaugment': 'rand-m9-mstd0.5-inc1',
             'data.random_erasing': 0.25, 'data.scale': [0.08, 1.0], 'data.interpolation': 'bicubic',
             'data.image_size': 224}
    singh_epochs = {'convnext_t': 300, 'convnext_iso': 300, 'vit_s': 300, 'vit_b': 250, 'convnext_b': 250,
                    'convnext_l': 100, 'convnext_s': 50, 'vit_m': 50}
    for a in range(1, 5):
        for o, fields in objectives.items():
            yield f'rrn_a{a}_{o}', {**huang, **fields, 'model.name': f'robust_resnet_a{a}'}
        yield f'rrn_a{a}_advanced', {**advanced, 'model.name': f'robust_resnet_a{a}'}
    yield 'rrn_a1_trades_cifar100', {**huang, **objectives['trades'], 'data.dataset': 'cifar100', 'data.rotation': 20}
    yield 'score_wrn_28_10', {**score, 'model.name': 'wrn_28_10_swish', 'run.batch_size': 512, 'optim.lr': 0.2}
    yield 'score_wrn_70_16', {**score, 'model.name': 'wrn_70_16_swish', 'run.batch_size': 1024, 'optim.lr': 0.4}
    for model, epochs in singh_epochs.items():
        assert f'singh2023_{model}' in names
        yield f'singh2023_{model}', {**singh, 'run.epochs': epochs, 'schedule.warmup_epochs': 20 if epochs > 100 else 10,
                                     'optim.no_weight_decay': '1d' if model.startswith('vit') else 'bias'}


# --- data plan and augmentation ----------------------------------------------------------------------
def test_batch_plan_is_a_function_of_seed_and_step_and_shards_the_global_batch():
    kw = dict(n_train=50, n_generated=30, batch_size=8, generated_fraction=0.25, seed=3, crop_padding=4, flip=True,
              rotation=0.0)
    plan = BatchPlan(**kw)
    assert plan.steps_per_epoch == 7 and plan.n_gen_per_batch == 2
    # the real images of consecutive steps walk through a permutation: no repeats within a pass
    seen = torch.cat([plan.real_indices(s) for s in range(8)])  # 8 * 6 = 48 <= 50
    assert seen.unique().numel() == 48
    whole = plan.step(5)
    halves = [BatchPlan(**kw).step(5, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.attack_seeds for h in halves]), whole.attack_seeds)
    assert torch.equal(torch.cat([h.crop_offsets for h in halves]), whole.crop_offsets)
    assert sorted(torch.cat([h.real_index for h in halves]).tolist()) == sorted(whole.real_index.tolist())
    assert whole.generated_index.numel() == 2


def test_augment_crops_flips_and_rotates_like_torchvision():
    from torchvision.transforms import v2
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    padded = v2.functional.pad(x, [4])
    out = augment(x, crop_offsets=torch.tensor([[1, 6]]), crop_padding=4, flips=torch.tensor([True]))
    expected = v2.functional.horizontal_flip(padded[:, :, 1:33, 6:38]).float() / 255
    assert torch.equal(out, expected)
    same = augment(x, crop_offsets=torch.tensor([[4, 4]]), crop_padding=4, flips=torch.tensor([False]),
                   angles=torch.tensor([0.0]))
    assert torch.equal(same, x.float() / 255)
    # rotating by 90 degrees is exact on the pixel grid
    rot = augment(x, angles=torch.tensor([90.0]))
    assert torch.equal(rot, torch.rot90(x, 1, dims=(2, 3)).float() / 255)


# --- optimiser, schedule, weight averaging ------------------------------------------------------------
def test_generated_data_must_fit_the_training_set(tmp_path):
    """Extra images are refused when their labels do not pair with them, or do not fit the dataset."""
    import numpy as np
    from PIL import Image

    from robust_resnets.training.data import load_generated, load_training_data
    for c in ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'):
        (tmp_path / 'c10' / 'train' / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'c10' / 'train' / c / '0.png')
    cfg = _cfg(data={'root': str(tmp_path / 'c10'), 'holdout': 2, 'generated': str(tmp_path / 'gen.npz'),
                     'generated_fraction': 0.5}, eval={'split': 'holdout'})
    images = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / 'gen.npz', image=images, label=np.arange(3))
    with pytest.raises(ValueError, match='labels must be 4 integers, one per image'):
        load_generated(tmp_path / 'gen.npz')
    np.savez(tmp_path / 'gen.npz', image=images, label=np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match='are not all in 0..9'):
        load_training_data(cfg.data, cfg.eval)
    np.savez(tmp_path / 'gen.npz', image=np.zeros((4, 28, 28, 3), np.uint8), label=np.arange(4))
    with pytest.raises(ValueError, match=r'its images are \(28, 28\) pixels, the cifar10 training images \(32, 32\)'):
        load_training_data(cfg.data, cfg.eval)
    np.savez(tmp_path / 'gen.npz', image=images, label=np.arange(4))
    data = load_training_data(cfg.data, cfg.eval)
    assert data.generated_images.shape == (4, 32, 32, 3) and data.train_images.shape[0] == 8


def _tiny_model():
    import timm

    import robust_resnets  # noqa: F401
    return timm.create_model('preact_resnet', **TINY['kwargs'])


def test_optimizer_skips_decay_on_norm_parameters_only_when_asked():
    from robust_resnets.training.trainer import build_optimizer
    model = _tiny_model()
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    opt = build_optimizer(model, _cfg(optim={'no_weight_decay': 'norm', 'weight_decay': 5e-4}))
    decay, no_decay = opt.param_groups
    assert {id(p) for p in no_decay['params']} == norm_params and no_decay['weight_decay'] == 0
    assert decay['weight_decay'] == 5e-4 and len(decay['params']) + len(norm_params) == len(list(model.parameters()))
    assert len(build_optimizer(model, _cfg()).param_groups) == 1


def test_schedules():
    from robust_resnets.training.trainer import build_optimizer, build_scheduler
    model = _tiny_model()
    cfg = _cfg(schedule={'name': 'multistep', 'milestones': [2, 3]}, run={'epochs': 4})
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    assert record_lrs(opt, sched, 4) == pytest.approx([0.1, 0.1, 0.01, 0.001])
    cfg = _cfg(schedule={'name': 'onecycle', 'interval': 'step', 'pct_start': 0.25}, run={'epochs': 2})
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10)
    lrs, moms = [], []
    for _ in range(19):
        lrs.append(opt.param_groups[0]['lr'])
        moms.append(opt.param_groups[0]['momentum'])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 4  # torch: the rise ends at step pct_start * total - 1 and lrs[0] == pytest.approx(0.1 / 25)
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85)
    for warmup in (0.5, 2.5):  # a warm-up that ends within an epoch reaches the peak, never more
        cfg = _cfg(schedule={'name': 'cosine', 'warmup_epochs': warmup}, run={'epochs': 6})
        opt = build_optimizer(model, cfg)
        lrs = record_lrs(opt, build_scheduler(opt, cfg, steps_per_epoch=3), 6)
        assert max(lrs) == pytest.approx(0.1) and lrs[math.ceil(warmup) - 1] == pytest.approx(0.1)
    short = _cfg(schedule={'name': 'onecycle', 'interval': 'step', 'pct_start': 0.25}, run={'epochs': 1})
    with pytest.raises(ConfigError, match='exactly one step'):  # torch would divide by zero
        build_scheduler(build_optimizer(model, short), short, steps_per_epoch=4)


def test_weight_average_follows_gowal_et_al():
    from robust_resnets.training.trainer import WeightAverage
    model = _tiny_model()
    ema = WeightAverage(model, decay=0.995, warmup_steps=5)
    assert [ema.get_decay(s) for s in (1, 4)] == [0.0, 0.0]
    assert ema.get_decay(5) == pytest.approx(1 / 10) and ema.get_decay(15) == pytest.approx(11 / 20)
    assert ema.get_decay(10_000) == 0.995
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.norm.running_mean.add_(3.0)
    ema.update(model, step=3)  # warm-up: a copy
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()))
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=5)
    for b, e, m in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.1 * b + 0.9 * m)


# --- the attack inside training ----------------------------------------------------------------------
@pytest.mark.parametrize('objective,attack_bn', [('trades', 'eval'), ('score', 'train'), ('pgd_at', 'eval')])
def test_training_attack_stays_in_budget(tmp_path, monkeypatch, objective, attack_bn):
    import robust_resnets.attacks.pgd as pgd
    calls = []
    original = pgd.pgd_attack

    def recording(model, images, labels, **kw):
        adv = original(model, images, labels, **kw)
        calls.append((images.clone(), adv.clone(), kw['eps'], model.training))
        return adv

    monkeypatch.setattr(pgd, 'pgd_attack', recording)
    cfg = _cfg(objective={'name': objective, 'attack_bn': attack_bn}, run={'epochs': 1},
               eval={'pgd_steps': 0})
    from robust_resnets.training.trainer import train
    train(cfg, tmp_path / 'run', data=_data())
    assert len(calls) == 3
    for images, adv, eps, training in calls:
        assert eps == pytest.approx(EPS)
        assert training == (attack_bn == 'train')
        delta = (adv - images).abs().amax()
        assert delta <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert delta > EPS / 2  # the attack moved


def test_attack_mode_freezes_parameters_and_batch_norm_statistics():
    import timm

    import robust_resnets  # noqa: F401
    from robust_resnets.training.trainer import _attack_mode
    model = timm.create_model('preact_resnet', **TINY['kwargs'])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ('train', 'eval'):
        with _attack_mode(model, mode):
            assert model.training == (mode == 'train')
            assert not any(p.requires_grad for p in model.parameters())
            model(torch.rand(4, 3, 32, 32))
        assert model.training and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    model(torch.rand(4, 3, 32, 32))  # outside the attack, train mode updates the statistics again
    assert not torch.equal(model.state_dict()['norm.running_mean'], before['norm.running_mean'])


# --- resume, divergence, export ----------------------------------------------------------------------
def _resume_cfg(**run):
    return _cfg(objective={'name': 'trades', 'attack_bn': 'train', 'bn_update': 'adversarial'},
                data={'generated': 'unused.npz', 'generated_fraction': 0.25, 'rotation': 15},
                optim={'nesterov': True, 'no_weight_decay': 'norm', 'grad_clip': 1.0},
                schedule={'name': 'onecycle', 'interval': 'step'},
                ema={'enabled': True, 'warmup_epochs': 0.5}, run={'bn_momentum': 0.01, 'epochs': 2, **run})


def test_kill_and_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    from robust_resnets.training.trainer import train
    data = _data(n_generated=20)
    straight = train(_resume_cfg(), tmp_path / 'straight', data=data)
    assert straight['status'] == 'finished' and straight['step'] == 6
    stopped = train(_resume_cfg(max_steps=4), tmp_path / 'killed', data=data)
    assert stopped['status'] == 'stopped' and stopped['step'] == 4
    assert not (tmp_path / 'killed' / 'model.safetensors').exists()
    # killed after logging an epoch and before its checkpoint: the resumed run trains and logs that epoch again
    with (tmp_path / 'killed' / 'metrics.jsonl').open('a') as f:
        f.write(json.dumps({'epoch': 2, 'step': 6, 'train_loss': 0.0, 'epoch_time_s': 0.0}) + '\n')
    resumed = train(_resume_cfg(), tmp_path / 'killed', data=data, resume=True)
    assert resumed['step'] == 6
    a, b = _weights(tmp_path / 'straight' / 'model.safetensors'), _weights(tmp_path / 'killed' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = torch.load(tmp_path / 'straight' / 'last.pt', weights_only=False)
    last_b = torch.load(tmp_path / 'killed' / 'last.pt', weights_only=False)
    assert all(torch.equal(v, last_b['model'][k]) for k, v in last_a['model'].items())
    assert last_a['scheduler'] == last_b['scheduler']
    log = lambda p: [json.loads(x) for x in (p / 'metrics.jsonl').read_text().splitlines()]  # noqa: E731
    epochs_a = [r for r in log(tmp_path / 'straight') if 'epoch' in r and 'event' not in r]
    epochs_b = [r for r in log(tmp_path / 'killed') if 'epoch' in r and 'event' not in r]
    strip = lambda r: {k: v for k, v in r.items() if k != 'epoch_time_s'}  # noqa: E731
    assert [strip(r) for r in epochs_a] == [strip(r) for r in epochs_b]

    # the EMA sits under timm's key: timm's loader picks the exported average; our filters ask which one
    from timm.models import load_state_dict
    from robust_resnets.models.layers import strip_checkpoint_wrappers
    timm_ema = load_state_dict(str(tmp_path / 'killed' / 'last.pt'), use_ema=True)
    assert timm_ema.keys() == b.keys() and all(torch.equal(timm_ema[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="ambiguous.*--key state_dict_ema"):
        strip_checkpoint_wrappers(last_b)

    exported = {f: (tmp_path / 'killed' / f).read_bytes() for f in ('model.safetensors', 'config.json', 'metrics.jsonl')}
    again = train(_resume_cfg(), tmp_path / 'killed', data=data, resume=True)  # a run that already ended
    assert again['status'] == 'finished' and again['step'] == 6
    assert exported == {f: (tmp_path / 'killed' / f).read_bytes() for f in exported}  # its export and log are kept

    # killed during its final export: resuming exports again, with the final metrics kept in last.pt
    for f in ('model.safetensors', 'config.json'):
        (tmp_path / 'killed' / f).unlink()
    train(_resume_cfg(), tmp_path / 'killed', data=data, resume=True)
    assert (tmp_path / 'killed' / 'model.safetensors').read_bytes() == exported['model.safetensors']
    training = lambda p: json.loads((p / 'config.json').read_text())['training']  # noqa: E731
    assert training(tmp_path / 'killed')['final_metrics'] == training(tmp_path / 'straight')['final_metrics'] != {}


def test_ctrl_c_saves_the_current_step_and_resume_gives_the_straight_run(tmp_path, monkeypatch):
    import robust_resnets.attacks.pgd as pgd_mod
    from robust_resnets.training.trainer import TrainingInterrupted, _StopRequest, train
    import robust_resnets.training.trainer as trainer_mod
    data = _data(n_generated=20)
    # two passes a step: a resumed run with gradient accumulation is exact too
    cfg = _resume_cfg(grad_accum_steps=2)
    train(cfg, tmp_path / 'straight', data=data)
    # Ctrl-C in the second step's attacks: that step is finished, saved, and the run stops
    monkeypatch.setattr(pgd_mod, 'pgd_attack', _sigint_on_call(pgd_mod.pgd_attack, 3))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, tmp_path / 'killed', data=data)
    assert stopped.value.step == 2 and stopped.value.checkpoint == tmp_path / 'killed' / 'last.pt'
    assert torch.load(stopped.value.checkpoint, weights_only=False)['step'] == 2  # mid-epoch (3 steps an epoch)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again
    monkeypatch.undo()
    train(cfg, tmp_path / 'killed', data=data, resume=True)
    a, b = (_weights(tmp_path / run / 'model.safetensors') for run in ('straight', 'killed'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Ctrl-C during the epoch-end evaluation: the run stops on the epoch's checkpoint, without another step
    monkeypatch.setattr(trainer_mod, 'evaluate', _sigint_on_call(trainer_mod.evaluate, 1))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, tmp_path / 'at_epoch_end', data=data)
    assert stopped.value.step == 3
    monkeypatch.undo()
    # on the step that run.max_steps stops at, the run stops as asked ('stopped'), with no Ctrl-C error
    monkeypatch.setattr(pgd_mod, 'pgd_attack', _sigint_on_call(pgd_mod.pgd_attack, 1))
    assert train(_resume_cfg(max_steps=1), tmp_path / 'max_steps', data=data)['status'] == 'stopped'
    monkeypatch.undo()

    # a second Ctrl-C stops at once, unless it comes within a second (torchrun passes the first one on)
    clock = iter([100.0, 100.5, 102.0])
    monkeypatch.setattr('time.monotonic', lambda: next(clock))
    request = _StopRequest(announce=False)
    request(signal.SIGINT, None)
    request(signal.SIGINT, None)
    assert request.requested
    with pytest.raises(KeyboardInterrupt):
        request(signal.SIGINT, None)
    # a data-loading worker forked from the run inherits the handler and leaves the stopping to the run
    worker = _StopRequest(announce=True)
    monkeypatch.setattr('os.getpid', lambda: -1)
    worker(signal.SIGINT, None)
    assert not worker.requested


def test_resume_and_run_directory_errors(tmp_path):
    from robust_resnets.training.trainer import train
    data = _data()
    with pytest.raises(FileNotFoundError, match='Nothing to resume'):
        train(_cfg(), tmp_path / 'empty', data=data, resume=True)
    train(_cfg(run={'max_steps': 1}), tmp_path / 'run', data=data)
    with pytest.raises(FileExistsError, match='already holds a run'):
        train(_cfg(), tmp_path / 'run', data=data)
    # a stopped run has no export yet: a new run starts from its last.pt (it holds no moving average)
    with pytest.raises(ConfigError, match=r"differs .* in: optim.lr.*start a new run: --set "
                                          r"model.pretrained_file=.*run/last.pt --out NEW_RUN"):
        train(_cfg(optim={'lr': 0.5}), tmp_path / 'run', data=data, resume=True)
    # the saved recipe has no stop point: `train --out RUN --resume` (which loads it) runs on to the end
    saved = load_config(tmp_path / 'run' / 'train_config.yaml')
    assert saved.run.max_steps is None
    assert train(saved, tmp_path / 'run', data=data, resume=True)['status'] == 'finished'

    # a run that ended before its first checkpoint starts again with --resume
    train(_cfg(run={'max_steps': 1}), tmp_path / 'early', data=data)
    (tmp_path / 'early' / 'last.pt').unlink()
    with (tmp_path / 'early' / 'metrics.jsonl').open('a') as f:
        f.write('{"epoch": 1, "step": 1, "train_lo')  # killed while writing a record
    with pytest.raises(FileExistsError, match='ended before its first checkpoint; pass --resume'):
        train(_cfg(), tmp_path / 'early', data=data)
    with pytest.raises(ConfigError, match='differs .* in: optim.lr'):
        train(_cfg(optim={'lr': 0.5}), tmp_path / 'early', data=data, resume=True)
    again = train(_cfg(), tmp_path / 'early', data=data, resume=True)
    assert again['status'] == 'finished' and again['step'] == train(_cfg(), tmp_path / 'fresh', data=data)['step']
    epoch_steps = lambda run: [json.loads(x)['step'] for x in (tmp_path / run / 'metrics.jsonl').read_text().splitlines()
                               if 'event' not in json.loads(x)]  # noqa: E731
    assert epoch_steps('early') == epoch_steps('fresh') == [3, 6]  # each epoch logged once, the cut-off line gone
    a, b = _weights(tmp_path / 'early' / 'model.safetensors'), _weights(tmp_path / 'fresh' / 'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_model_and_split_mistakes_are_named(tmp_path):
    """An --out that is a file or another folder's contents, model.kwargs the model does not take, and a
    holdout nothing would use are refused with one line each, before anything is written."""
    from robust_resnets.training.trainer import train
    data = _data()
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(FileExistsError, match="'.*afile' is a file; give the directory"):
        train(_cfg(), tmp_path / 'afile', data=data)
    converted = tmp_path / 'converted'
    converted.mkdir()
    (converted / 'model.safetensors').write_text('weights of something else')
    with pytest.raises(FileExistsError, match=r'is not a run directory but holds files \(model.safetensors\)'):
        train(_cfg(), converted, data=data)
    assert (converted / 'model.safetensors').read_text() == 'weights of something else'
    with pytest.raises(ValueError, match=r"model.kwargs \{'depth': 3\} do not fit model.name 'resnet18'"):
        train(_cfg(model={'name': 'resnet18', 'kwargs': {'depth': 3}}), tmp_path / 'r18', data=data)
    with pytest.raises(ConfigError, match="eval.split is 'test', so the data.holdout=1024 held-out images"):
        _cfg(eval={'split': 'test'})
    assert _cfg(eval={'split': 'test'}, data={'holdout': 0}).eval.split == 'test'


def test_a_tag_as_model_name_exports_the_architecture_it_built(tmp_path, monkeypatch):
    """model.name may be a manifest tag: the export's model_args are the tag's, so the weights load back."""
    import timm

    from _weights_fixtures import entry, use_manifest
    from robust_resnets.training.trainer import train
    use_manifest(monkeypatch, tmp_path / 'manifest', {
        'preact_resnet.fx_tiny': entry(name='fx_tiny', model_args=TINY['kwargs'])})
    run = tmp_path / 'run'
    train(_cfg(model={'name': 'preact_resnet.fx_tiny', 'kwargs': {}}, run={'epochs': 1}), run, data=_data())
    config = json.loads((run / 'config.json').read_text())
    assert config['architecture'] == 'preact_resnet' and config['model_args'] == TINY['kwargs']
    model = timm.create_model(config['architecture'], pretrained=True, pretrained_cfg_overlay=dict(
        file=str(run / 'model.safetensors')), **config['model_args'])
    saved = _weights(run / 'model.safetensors')
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import dataclasses

    import robust_resnets.training.trainer as trainer_mod
    from robust_resnets.training.losses import get_objective
    calls = {'n': 0}
    base = get_objective('trades')

    def poisoned(*args, **kwargs):
        calls['n'] += 1
        loss = base.loss(*args, **kwargs)
        return loss * float('nan') if calls['n'] == 5 else loss

    monkeypatch.setattr(trainer_mod, 'get_objective', lambda name: dataclasses.replace(base, loss=poisoned))
    with pytest.raises(trainer_mod.TrainingDiverged, match=r'non-finite at step 4 .*last good checkpoint .*step 3'):
        trainer_mod.train(_cfg(), tmp_path / 'run', data=_data())
    assert torch.load(tmp_path / 'run' / 'last.pt', weights_only=False)['step'] == 3
    assert not (tmp_path / 'run' / 'model.safetensors').exists()
    events = [json.loads(x).get('event') for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert events[-1] == 'diverged'
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's again after an error


def test_export_loads_in_timm_and_fine_tunes_with_a_new_head(tmp_path):
    import timm

    from robust_resnets.training.trainer import train
    run = tmp_path / 'run'
    train(_cfg(objective={'name': 'pgd_at'}, run={'epochs': 1}), run, data=_data())
    config = json.loads((run / 'config.json').read_text())
    assert config['architecture'] == 'preact_resnet' and config['training']['objective'] == 'pgd_at'
    model = timm.create_model('preact_resnet', pretrained=True, pretrained_cfg_overlay=dict(
        file=str(run / 'model.safetensors')), **TINY['kwargs'])
    saved = _weights(run / 'model.safetensors')
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    # the README's recipe with the config's own model_args, for a new head
    tuned = timm.create_model(config['architecture'], pretrained=True, num_classes=100, pretrained_cfg_overlay=dict(
        file=str(run / 'model.safetensors')), **config['model_args'])
    assert tuned.num_classes == 100 and torch.equal(tuned.stem.weight, saved['stem.weight'])
    from timm.models._factory import parse_model_name
    try:
        has_local_dir = parse_model_name('local-dir:x')[0] == 'local-dir'
    except AssertionError:  # timm 1.0.9 knows no local-dir: source
        has_local_dir = False
    if has_local_dir:
        local = timm.create_model(f'local-dir:{run}', pretrained=True)
        assert local.num_classes == 10 and all(torch.equal(v, saved[k]) for k, v in local.state_dict().items())
    # fine-tuning: the exported weights with a fresh 100-class head
    cfg = _cfg(model={'pretrained_file': str(run / 'model.safetensors'), 'num_classes': 100},
               objective={'name': 'clean'}, run={'max_steps': 1})
    data = _data()
    data.train_labels = data.train_labels * 10
    train(cfg, tmp_path / 'finetune', data=data)
    tuned = torch.load(tmp_path / 'finetune' / 'last.pt', weights_only=False)['model']
    assert tuned['head.fc.weight'].shape == (100, 64)
    # without model.kwargs the architecture recorded beside the file is built, and exported again
    bare = _cfg(model={'pretrained_file': str(run / 'model.safetensors'), 'kwargs': {}}, objective={'name': 'clean'},
                run={'epochs': 1})
    train(bare, tmp_path / 'finetune_bare', data=_data())
    assert json.loads((tmp_path / 'finetune_bare' / 'config.json').read_text())['model_args'] == TINY['kwargs']
    # a fine-tune resumes without its starting file: the checkpoint holds the weights and the arguments built
    moved = tmp_path / 'moved'
    shutil.copytree(run, moved)
    resumable = _cfg(model={'pretrained_file': str(moved / 'model.safetensors'), 'kwargs': {}},
                     objective={'name': 'clean'}, run={'epochs': 1})
    train(dataclasses.replace(resumable, run=dataclasses.replace(resumable.run, max_steps=1)), tmp_path / 'ft_resume',
          data=_data())
    shutil.rmtree(moved)
    train(resumable, tmp_path / 'ft_resume', data=_data(), resume=True)
    assert json.loads((tmp_path / 'ft_resume' / 'config.json').read_text())['model_args'] == TINY['kwargs']
    with pytest.raises(ValueError, match=r"model.pretrained_file: .* was trained as preact_resnet with depths=\[1, 1, 1\] "
                                         r"\(says .*config.json\), which contradicts your depths=\[2, 2, 2\]"
                                         r".*'model.kwargs=\{\}'"):
        train(_cfg(model={'pretrained_file': str(run / 'model.safetensors'), 'kwargs': {'depths': [2, 2, 2]}}),
              tmp_path / 'finetune_other', data=_data())
    # a training state with the weights and their average: which to start from is not guessed
    ema_run = tmp_path / 'ema'
    train(_cfg(ema={'enabled': True}, run={'max_steps': 1}), ema_run, data=_data())
    with pytest.raises(ValueError, match='holds both trained weights and their moving average'):
        train(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_file=str(ema_run / 'last.pt'))),
              tmp_path / 'finetune_ema', data=data)


# --- DDP ---------------------------------------------------------------------------------------------
def _ddp_worker(rank, port, runs, data):
    # one process group for the runs (config, run directory): the trainer leaves a group it did not create in place
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo')
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from robust_resnets.training.trainer import train

    class CountingDDP(torch.nn.parallel.DistributedDataParallel):  # counts the gradient reductions
        calls = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

            def hook(state, bucket):
                CountingDDP.calls += 1
                return allreduce_hook(state, bucket)
            self.register_comm_hook(None, hook)

    torch.nn.parallel.DistributedDataParallel = CountingDDP
    for cfg_dict, out in runs:
        CountingDDP.calls = 0
        train(config_from_dict(cfg_dict), out, data=data)
        if rank == 0:
            (Path(out) / 'gradient_reductions.txt').write_text(str(CountingDDP.calls))
    torch.distributed.destroy_process_group()


def _ddp_resume_worker(rank, port, cfg_dict, data, out):
    # one process group for the runs: the trainer leaves a group it did not create in place
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo')
    from robust_resnets.training.trainer import TrainingInterrupted, train
    cfg = config_from_dict(cfg_dict)
    train(cfg, f'{out}/straight', data=data)
    train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, max_steps=3)), f'{out}/killed', data=data)
    train(cfg, f'{out}/killed', data=data, resume=True)
    # Ctrl-C seen by one process only, in its third step's attack (its fourth call: the epoch-end evaluation
    # attacks too): both stop after that step and save it
    import robust_resnets.attacks.pgd as pgd_mod
    attack = pgd_mod.pgd_attack
    pgd_mod.pgd_attack = _sigint_on_call(attack, 4 if rank == 1 else None)
    try:
        train(cfg, f'{out}/interrupted', data=data)
        raise AssertionError('Ctrl-C did not stop the run')
    except TrainingInterrupted as e:
        assert e.step == 3, e.step
    finally:
        pgd_mod.pgd_attack = attack
    train(cfg, f'{out}/interrupted', data=data, resume=True)
    torch.distributed.destroy_process_group()


def _sigint_on_call(func, n):
    """``func``, sending this process a SIGINT (Ctrl-C) in its ``n``-th call (never with None)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            signal.raise_signal(signal.SIGINT)
        return func(*args, **kwargs)
    return wrapped


def _spawn_two(worker, *args):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    workers = mp.spawn(worker, args=(port, *args), nprocs=2, join=False)
    # a hang fails the test instead of the whole suite: with torch 2.1, gloo's process-group teardown
    # left one worker waiting forever in 9 of 67 runs
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):
        if time.monotonic() > deadline:
            for p in workers.processes:
                p.kill()
            pytest.fail('the two DDP workers did not finish within 300 s')


def test_ddp_two_processes_match_one_process_on_the_same_global_batch_also_with_accumulation(tmp_path):
    # GroupNorm instead of batch norm: per-example computations, so a batch split over two processes
    # must give the same update as the whole batch in one (batch norm would see per-process statistics).
    cfg = _cfg(model={'kwargs': {**TINY['kwargs'], 'normalizations': 'GroupNorm'}},
               objective={'name': 'trades'}, run={'epochs': 1}, optim={'grad_clip': 1.0})
    data = _data(n_train=32)
    # and with two passes per process and step: DDP must add the passes' gradients before it reduces them
    accum = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, grad_accum_steps=2))
    _spawn_two(_ddp_worker, [(config_to_dict(cfg), str(tmp_path / 'ddp')),
                             (config_to_dict(accum), str(tmp_path / 'ddp_accum'))], data)
    from robust_resnets.training.trainer import train
    train(cfg, tmp_path / 'single', data=data)
    single = torch.load(tmp_path / 'single' / 'last.pt', weights_only=False)
    for run in ('ddp', 'ddp_accum'):
        _assert_same_update(torch.load(tmp_path / run / 'last.pt', weights_only=False), single, cfg)
    log = [json.loads(x) for x in (tmp_path / 'ddp_accum' / 'metrics.jsonl').read_text().splitlines()]
    assert log[0]['world_size'] == 2 and log[0]['grad_accum_steps'] == 2
    # the passes before a step's last one keep their gradients local: as many reductions as without accumulation
    reductions = [int((tmp_path / run / 'gradient_reductions.txt').read_text()) for run in ('ddp', 'ddp_accum')]
    assert reductions[0] == reductions[1] > 0


def _assert_same_update(other, single, cfg):
    """``other`` (a last.pt) holds the weights and optimizer state of ``single`` up to float summation order."""
    assert other['step'] == single['step'] == 2
    # the same update up to float summation order: TRADES' sign-gradient attack can flip the sign of a
    # pixel's step where the gradient is ~0, which moves weights by ~1e-6; a wrong gradient reduction or
    # batch split moves them by ~1e-2 (the update itself is that large)
    import timm
    torch.manual_seed(cfg.run.seed)
    init = timm.create_model('preact_resnet', **cfg.model.kwargs).state_dict()
    assert max((v - init[k]).abs().max().item() for k, v in single['model'].items()) > 1e-3
    for k, v in single['model'].items():
        torch.testing.assert_close(other['model'][k], v, rtol=1e-4, atol=2e-5, msg=k)
    # momentum buffers hold gradients, where such a flip shows most (2.2e-5 seen with torch 2.1); each
    # buffer's largest entry is far above that tolerance, so a wrong reduction still fails
    torch.testing.assert_close(other['optimizer']['state'], single['optimizer']['state'], rtol=1e-4, atol=1e-4)
    buffers = [s['momentum_buffer'].abs().max().item() for s in single['optimizer']['state'].values()]
    assert min(buffers) > 1e-3


def test_gradient_accumulation_gives_the_whole_batch_update_and_may_change_on_resume(tmp_path):
    from robust_resnets.training.trainer import train
    # GroupNorm: per-example computations, so two or four passes of a step add up to the whole batch's update
    # (no gradient clipping: it would hide passes whose gradients are summed instead of averaged)
    cfg = _cfg(model={'kwargs': {**TINY['kwargs'], 'normalizations': 'GroupNorm'}},
               objective={'name': 'trades'}, run={'epochs': 1})
    with_accum = lambda n, **run: dataclasses.replace(  # noqa: E731
        cfg, run=dataclasses.replace(cfg.run, grad_accum_steps=n, **run))
    data = _data(n_train=32)
    train(cfg, tmp_path / 'whole', data=data)
    whole = torch.load(tmp_path / 'whole' / 'last.pt', weights_only=False)
    for n in (2, 4):
        train(with_accum(n), tmp_path / f'accum{n}', data=data)
        _assert_same_update(torch.load(tmp_path / f'accum{n}' / 'last.pt', weights_only=False), whole, cfg)
        log = [json.loads(x) for x in (tmp_path / f'accum{n}' / 'metrics.jsonl').read_text().splitlines()]
        first, epoch = log[0], next(r for r in log if r.get('epoch') == 1)
        assert first['grad_accum_steps'] == n and epoch['step'] == 2
    # a run goes on with another number of passes (e.g. on fewer GPUs), and its next resume keeps that number
    train(with_accum(2, max_steps=1), tmp_path / 'changed', data=data)
    train(with_accum(4), tmp_path / 'changed', data=data, resume=True)
    _assert_same_update(torch.load(tmp_path / 'changed' / 'last.pt', weights_only=False), whole, cfg)
    assert load_config(str(tmp_path / 'changed' / 'train_config.yaml')).run.grad_accum_steps == 4
    resumed = [json.loads(x) for x in (tmp_path / 'changed' / 'metrics.jsonl').read_text().splitlines()
               if '"resume"' in x]
    assert resumed[-1]['grad_accum_steps'] == 4

    with pytest.raises(ConfigError, match=r'run.batch_size \(16\) must divide evenly over 1 process x 3 passes of '
                                          r'run.grad_accum_steps; 16 images a process split into 2 or 4 or 8 passes'):
        train(with_accum(3), tmp_path / 'uneven', data=data)
    with pytest.raises(ConfigError, match=r'per process and pass \(3\) must be even.*run.grad_accum_steps'):
        mixed = _cfg(data={'mixup_alpha': 0.8}, run={'batch_size': 12, 'grad_accum_steps': 4})
        train(mixed, tmp_path / 'odd', data=data)
    with pytest.raises(ConfigError, match='run.grad_accum_steps'):
        _cfg(run={'grad_accum_steps': 0})
    assert not any((tmp_path / run).exists() for run in ('uneven', 'odd'))


def test_ddp_resume_mid_epoch_after_a_stop_or_ctrl_c_gives_the_straight_run_with_batch_norm(tmp_path):
    # batch norm with eval-mode attacks: each process updates the statistics with its share of the batch, so
    # the processes must go on with one model's statistics (rank 0's, which the checkpoint holds) for a
    # resumed run to equal a straight one; the epoch's running loss must count every process once
    cfg = _cfg(objective={'name': 'trades', 'attack_bn': 'eval'}, run={'epochs': 2})
    _spawn_two(_ddp_resume_worker, config_to_dict(cfg), _data(n_train=32), str(tmp_path))
    a = _weights(tmp_path / 'straight' / 'model.safetensors')
    log = lambda p: [json.loads(x) for x in (p / 'metrics.jsonl').read_text().splitlines()]  # noqa: E731
    for run in ('killed', 'interrupted'):
        b = _weights(tmp_path / run / 'model.safetensors')
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
        epoch_2 = [[r for r in log(tmp_path / name) if r.get('epoch') == 2 and 'event' not in r][-1]
                   for name in ('straight', run)]
        for key in ('train_loss', 'train_clean_acc', 'train_adv_acc', 'val_clean_acc'):
            assert epoch_2[0][key] == pytest.approx(epoch_2[1][key], abs=1e-12), (run, key)
    assert {'event': 'interrupted', 'step': 3, 'epoch': 1.5} in log(tmp_path / 'interrupted')


# --- command line ------------------------------------------------------------------------------------
def test_cli_lists_recipes_and_reports_bad_keys(tmp_path, capsys):
    from robust_resnets.cli import main
    assert main(['train', '--list']) == 0
    listed = capsys.readouterr().out
    assert 'rrn_a1_trades' in listed.split() and 'quick_cifar10  ' in listed and 'Quick PGD-AT WRN-16-4' in listed
    assert main(['train', '--config', 'quick_cifar10', '--set', 'optim.lrr=1', '--out', str(tmp_path)]) == 1
    assert "Did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(['train', '--resume', '--out', str(tmp_path / 'none')]) == 1
    assert 'Nothing to resume' in capsys.readouterr().err
    assert main(['train', '--config', 'quick_cifar10', '--out', str(tmp_path / 'x')]) == 1
    assert 'data.root is not set' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()  # nothing is written before the data and the model are in place


def test_torchrun_entry_reports_errors_like_the_cli(tmp_path, capsys, monkeypatch):
    """python -m robust_resnets.train prints one line for the errors the CLI prints one line for (an OSError
    such as an --out below a file included) and says how to resume after Ctrl-C."""
    import robust_resnets.cli.train as cli_train
    from robust_resnets.train import main as torchrun_main

    def fails(error):
        def run(*args, **kwargs):
            raise error
        return run

    monkeypatch.setattr(cli_train, 'run', fails(NotADirectoryError(20, 'Not a directory', 'afile/sub')))
    assert torchrun_main(['--out', 'afile/sub']) == 1
    assert capsys.readouterr().err.strip() == "robust_resnets.train: error: [Errno 20] Not a directory: 'afile/sub'"
    monkeypatch.setattr(cli_train, 'run', fails(KeyboardInterrupt()))
    assert torchrun_main(['--out', 'x']) == 130
    monkeypatch.undo()
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'train_config.yaml').write_text(yaml.safe_dump(config_to_dict(_cfg())))
    import robust_resnets.training.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, 'train', fails(KeyboardInterrupt()))
    assert torchrun_main(['--resume', '--out', str(run)]) == 130
    assert f'the run starts again: no checkpoint was written yet; continue it with: robust-resnets train --out {run} ' \
        f'--resume' in capsys.readouterr().err
    monkeypatch.setattr(trainer_mod, 'train', fails(trainer_mod.TrainingInterrupted(7, run / 'last.pt')))
    assert torchrun_main(['--resume', '--out', str(run)]) == 130
    assert f'the run goes on from step 7, saved when Ctrl-C stopped it; continue it with: robust-resnets train ' \
        f'--out {run} --resume' in capsys.readouterr().err
    torch.save({'step': 5, 'model': {}}, run / 'last.pt')  # a second Ctrl-C: the last checkpoint's step
    monkeypatch.setattr(trainer_mod, 'train', fails(KeyboardInterrupt()))
    assert torchrun_main(['--resume', '--out', str(run)]) == 130
    assert 'the run goes on from its last checkpoint (step 5); continue it with' in capsys.readouterr().err


# --- real data ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not (DATA_DIR / 'cifar10-jpeg.tar.gz').is_file(),
                    reason=f'real CIFAR-10 JPEGs not found at {DATA_DIR} (see ../shared/data/README.md)')
def test_short_run_on_real_cifar10_learns(tmp_path):
    from robust_resnets.training.trainer import train
    # a 20k-parameter network, 512 training images, PGD-AT with a 1-step attack: ~30 s on one CPU core
    cfg = _cfg(data={'root': str(DATA_DIR / 'cifar10-jpeg.tar.gz'), 'holdout': 500, 'train_subset': 512},
               objective={'name': 'pgd_at'}, attack={'eps': 2 / 255, 'step_size': 2 / 255, 'steps': 1},
               optim={'lr': 0.05, 'nesterov': True, 'weight_decay': 5e-4},
               schedule={'name': 'constant'}, eval={'pgd_steps': 0, 'batch_size': 250},
               model={'kwargs': {'depths': [1, 1, 1], 'widths': [0.5, 0.5, 0.5]}},
               run={'epochs': 5, 'batch_size': 32})
    train(cfg, tmp_path / 'run')
    epochs = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
              if 'train_loss' in x]
    assert epochs[-1]['train_loss'] < epochs[0]['train_loss'] - 0.1, epochs
    # 500 held-out images, chance 10% (std 1.3%): 16% is 4.5 standard deviations above chance
    assert epochs[-1]['val_clean_acc'] > 0.16, epochs
