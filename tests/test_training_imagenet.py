"""Singh et al. 2023's ImageNet recipe in the training package: APGD inner attack, heavy augmentations,
mixup/CutMix soft targets, AdamW with their no-decay rules, warm-up + cosine floor, ImageNet folders."""
import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_resnets.training.config import ConfigError, config_from_dict, load_config
from robust_resnets.training.data import BatchPlan

from _training_fixtures import one_thread, random_cifar_data, record_lrs  # noqa: F401

DATA_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
TINY_VIT = {'name': 'vit_small_convstem',
            'kwargs': {'depth': 1, 'embed_dim': 32, 'num_heads': 2, 'img_size': 32, 'stem_widths': [4, 8, 8, 16]}}
pytestmark = pytest.mark.usefixtures('one_thread')
TINY_CIFAR = {'name': 'preact_resnet', 'kwargs': {'depths': [1, 1, 1], 'widths': [1, 1, 1]}}




def _imagenet_cfg(root, **sections):
    """The ViT-S recipe on a tiny ViT, small batches and images; ``sections`` update it key by key."""
    from robust_resnets.training.config import config_to_dict
    values = config_to_dict(load_config('singh2023_vit_s'))
    small = {'model': TINY_VIT, 'data': {'root': str(root), 'image_size': 32, 'workers': 0},
             'eval': {'max_examples': 8, 'batch_size': 8, 'pgd_steps': 1, 'every': 1},
             'run': {'epochs': 1, 'batch_size': 8, 'progress': False}}
    for changes in (small, sections):
        for name, section in changes.items():
            values[name] = {**values[name], **section}
    return config_from_dict(values)


def _fake_imagenet(root: Path, *, classes: int = 4, per_class: int = 6, size: int = 40) -> Path:
    """train/ and val/ folders of random JPEGs under real ImageNet WordNet ids."""
    from robust_resnets.data.imagenet import imagenet_wnids
    rng = np.random.default_rng(0)
    for split, n in (('train', per_class), ('val', 2)):
        for wnid in imagenet_wnids()[:classes]:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'{wnid}_{i}.JPEG', quality=90)
    return root


# --- config ------------------------------------------------------------------------------------------
def test_singh_recipes_load_with_the_authors_settings():
    for name, model, epochs, rule, warmup in (
            ('singh2023_vit_s', 'vit_small_convstem', 300, '1d', 20),
            ('singh2023_vit_m', 'vit_medium_convstem', 50, '1d', 10),
            ('singh2023_vit_b', 'vit_base_convstem', 250, '1d', 20),
            ('singh2023_convnext_iso', 'convnext_iso_convstem', 300, 'bias', 20),
            ('singh2023_convnext_t', 'convnext_tiny_convstem', 300, 'bias', 20),
            ('singh2023_convnext_s', 'convnext_small_convstem', 50, 'bias', 10),
            ('singh2023_convnext_b', 'convnext_base_convstem', 250, 'bias', 20),
            ('singh2023_convnext_l', 'convnext_large_convstem', 100, 'bias', 10)):
        cfg = load_config(name)
        assert (cfg.model.name, cfg.run.epochs, cfg.optim.no_weight_decay, cfg.schedule.warmup_epochs) == \
            (model, epochs, rule, warmup)
        assert (cfg.attack.name, cfg.attack.steps, cfg.attack.eps, cfg.attack.random_start) == ('apgd', 2, 4 / 255, False)
        assert (cfg.objective.name, cfg.objective.label_smoothing, cfg.objective.attack_bn) == ('pgd_at', 0.1, 'eval')
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == ('adamw', 1e-3, [0.9, 0.95], 0.05)
        assert (cfg.schedule.warmup_start, cfg.schedule.min_lr) == (1e-4, 5e-6)
        assert (cfg.ema.enabled, cfg.ema.decay, cfg.ema.dynamic, cfg.ema.warmup_epochs) == (True, 0.9999, False, 0)
        d = cfg.data
        assert (d.randaugment, d.random_erasing, d.mixup_alpha, d.cutmix_alpha, d.mixup_switch_prob) == \
            ('rand-m9-mstd0.5-inc1', 0.25, 0.8, 1.0, 0.5)
        assert (d.interpolation, d.scale, d.mixing) == ('bicubic', [0.08, 1.0], True)


def test_config_refuses_recipes_that_cannot_work():
    with pytest.raises(ConfigError, match="data.randaugment, data.random_erasing need data.dataset 'imagenet'"):
        config_from_dict({'data': {'randaugment': 'rand-m9', 'random_erasing': 0.25}})
    with pytest.raises(ConfigError, match="objective 'mart' cannot take"):
        config_from_dict({'data': {'mixup_alpha': 0.8}, 'objective': {'name': 'mart'}})
    with pytest.raises(ConfigError, match='has no random start; set attack.random_start=false'):
        config_from_dict({'attack': {'name': 'apgd'}})
    with pytest.raises(ConfigError, match="set eval.max_examples"):
        config_from_dict({'data': {'dataset': 'imagenet', 'crop_padding': 0}})
    with pytest.raises(ConfigError, match='set data.crop_padding=0'):
        config_from_dict({'data': {'dataset': 'imagenet'}, 'eval': {'max_examples': 10}})
    with pytest.raises(ConfigError, match="'data.mixup_prob' must be in \\[0, 1\\]"):
        config_from_dict({'data': {'mixup_prob': 1.5}})
    with pytest.raises(ConfigError, match="'optim.name' is 'adam'; use one of 'sgd', 'adamw'"):
        config_from_dict({'optim': {'name': 'adam'}})
    with pytest.raises(ConfigError, match="'schedule.min_lr' .* must be below 'optim.lr'"):
        config_from_dict({'schedule': {'min_lr': 1.0}})
    with pytest.raises(ConfigError, match="'optim.decay_norm_params' was replaced by optim.no_weight_decay"):
        config_from_dict({'optim': {'decay_norm_params': False}})


# --- optimiser and schedule --------------------------------------------------------------------------
@pytest.mark.parametrize('recipe', ['singh2023_vit_s', 'singh2023_vit_m', 'singh2023_vit_b', 'singh2023_convnext_iso',
                                    'singh2023_convnext_t', 'singh2023_convnext_s', 'singh2023_convnext_b',
                                    'singh2023_convnext_l'])
def test_adamw_groups_follow_the_authors_rules_on_the_real_models(recipe):
    import timm

    import robust_resnets  # noqa: F401
    from robust_resnets.training.trainer import build_optimizer
    cfg = load_config(recipe)
    try:
        with torch.device('meta'):
            model = timm.create_model(cfg.model.name)
    except (RuntimeError, NotImplementedError) as e:  # timm 1.0.9 reads tensor values in ViT constructors
        if 'meta' not in str(e):
            raise
        pytest.skip(f'timm {timm.__version__} cannot build {cfg.model.name} on the meta device: {e}')
    named = dict(model.named_parameters())
    # main.py's create_optimizer: for ConvNeXts the names holding 'bn' or '.bias', otherwise ndim <= 1 or '.bias'
    if 'convnext' in cfg.model.name:
        authors = {k for k in named if any(c in k for c in ('bn', '.bias'))}
    else:
        authors = {k for k, p in named.items() if p.ndim <= 1 or k.endswith('.bias')}
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults['betas'] == (0.9, 0.95)
    no_decay = {id(p) for g in opt.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert no_decay == {id(named[k]) for k in authors}
    decayed = [g for g in opt.param_groups if g['weight_decay'] > 0]
    assert len(decayed) == 1 and decayed[0]['weight_decay'] == 0.05
    assert sum(len(g['params']) for g in opt.param_groups) == len(named)


def test_warmup_from_a_fraction_then_cosine_to_a_floor():
    import torch.nn as nn

    from robust_resnets.training.trainer import build_optimizer, build_scheduler
    cfg = config_from_dict({'optim': {'name': 'adamw', 'lr': 1e-3},
                            'schedule': {'name': 'cosine', 'interval': 'step', 'warmup_epochs': 2,
                                         'warmup_start': 1e-4, 'min_lr': 5e-6},
                            'run': {'epochs': 10}})
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = record_lrs(opt, sched, 50)
    assert lrs[0] == pytest.approx(1e-3 * (1e-4 + (1 - 1e-4) / 10))
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # 40 cosine steps: the last one is one step short of the floor
    assert lrs[-1] == pytest.approx(5e-6 + (1e-3 - 5e-6) * 0.5 * (1 + np.cos(np.pi * 39 / 40)))
    assert min(lrs) > 5e-6


# --- mixup and APGD in the loop (CIFAR tensors) ------------------------------------------------------
def _mixed_cfg(**run):
    return config_from_dict({
        'model': TINY_CIFAR, 'objective': {'name': 'pgd_at', 'label_smoothing': 0.1},
        'data': {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0},
        'attack': {'name': 'apgd', 'steps': 2, 'eps': 4 / 255, 'random_start': False},
        'optim': {'name': 'adamw', 'lr': 1e-3, 'no_weight_decay': '1d'},
        'schedule': {'name': 'cosine', 'interval': 'step', 'warmup_epochs': 1, 'warmup_start': 1e-4},
        'ema': {'enabled': True, 'decay': 0.9999, 'dynamic': False},
        'eval': {'pgd_steps': 1, 'batch_size': 8}, 'run': {'epochs': 2, 'batch_size': 8, 'progress': False, **run}})


def test_mixup_cutmix_targets_reach_the_attack_and_the_loss(tmp_path, monkeypatch):
    import dataclasses

    import robust_resnets.attacks.apgd as apgd_mod
    import robust_resnets.training.trainer as trainer_mod
    from robust_resnets.training.trainer import train
    seen, losses = [], []
    real = apgd_mod.apgd_attack
    objective = trainer_mod.get_objective('pgd_at')

    def loss_spy(clean_logits, adv_logits, targets, **hyper):
        losses.append((targets.clone(), dict(hyper)))
        return objective.loss(clean_logits, adv_logits, targets, **hyper)

    monkeypatch.setattr(trainer_mod, 'get_objective', lambda name: dataclasses.replace(objective, loss=loss_spy))

    def spy(model, images, labels, **kwargs):
        seen.append((labels.clone(), kwargs))
        out = real(model, images, labels, **kwargs)
        assert (out - images).abs().max() <= kwargs['eps'] + 1e-6
        return out

    monkeypatch.setattr(apgd_mod, 'apgd_attack', spy)
    summary = train(_mixed_cfg(), tmp_path / 'run', data=random_cifar_data(n_train=32, n_eval=8))
    assert summary['status'] == 'finished' and len(seen) == summary['step'] == 8
    for targets, kwargs in seen:
        assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
        # label smoothing 0.1 inside the mixed targets: no class below 0.1 / 10
        assert targets.min() >= 0.01 - 1e-6 and (kwargs['eps'], kwargs['steps'], kwargs['norm']) == (4 / 255, 2, 'Linf')
    assert any(t.max() < 0.9 for t, _ in seen)  # some batches really are mixed
    # the loss gets the same (smoothed, mixed) targets, and no second label smoothing on top
    assert len(losses) == 8 and all(h == {'label_smoothing': 0.0} for _, h in losses)
    assert all(torch.equal(t, a) for (t, _), (a, _) in zip(losses, seen))


def test_mixed_apgd_runs_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    from robust_resnets.training.trainer import train
    data = random_cifar_data(n_train=32, n_eval=8)
    train(_mixed_cfg(), tmp_path / 'straight', data=data)
    assert train(_mixed_cfg(max_steps=3), tmp_path / 'killed', data=data)['status'] == 'stopped'
    train(_mixed_cfg(), tmp_path / 'killed', data=data, resume=True)
    a = load_file(str(tmp_path / 'straight' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'killed' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_odd_per_process_batch_cannot_be_mixed(tmp_path):
    from robust_resnets.training.trainer import train
    with pytest.raises(ConfigError, match='must be even'):
        train(_mixed_cfg(batch_size=7), tmp_path / 'run', data=random_cifar_data(n_train=32, n_eval=8))
    assert not (tmp_path / 'run').exists()


# --- ImageNet folders --------------------------------------------------------------------------------
def test_imagenet_batches_do_not_depend_on_workers_or_processes(tmp_path):
    from robust_resnets.training.imagenet_data import ImageNetBatches, load_imagenet_training_data
    cfg = _imagenet_cfg(_fake_imagenet(tmp_path / 'in'))
    data = load_imagenet_training_data(cfg.data, cfg.eval)
    assert data.n_train == 24 and data.eval_images.shape == (8, 3, 32, 32) and data.num_classes == 1000
    plan = BatchPlan(n_train=data.n_train, n_generated=0, batch_size=8, generated_fraction=0.0, seed=0,
                     crop_padding=0, flip=False, rotation=0)

    def batches(workers, rank=0, world_size=1):
        d = dataclasses.replace(cfg.data, workers=workers)
        return list(ImageNetBatches(data, d, plan=plan, start=1, stop=3, rank=rank, world_size=world_size))

    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    one = batches(0)  # decoded in this process: the global random streams are left as they were
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert len(one) == 2 and one[0][0].shape == (8, 3, 32, 32) and one[0][0].dtype == torch.float32
    two_workers = batches(2)
    ranks = [batches(0, r, 2) for r in (0, 1)]
    for step in range(2):
        assert torch.equal(one[step][0], two_workers[step][0]) and torch.equal(one[step][1], two_workers[step][1])
        assert torch.equal(one[step][0], torch.cat([ranks[0][step][0], ranks[1][step][0]]))
    assert not torch.equal(one[0][0], one[1][0])
    # heavy augmentation really happened: random erasing draws normal noise outside [0, 1]
    assert any((x < 0).any() or (x > 1).any() for x, _ in one)


def test_imagenet_training_runs_end_to_end_and_exports(tmp_path):
    import timm

    from robust_resnets.training.trainer import train
    cfg = _imagenet_cfg(_fake_imagenet(tmp_path / 'in'), run={'epochs': 1})
    summary = train(cfg, tmp_path / 'run')
    assert summary['status'] == 'finished' and summary['step'] == 3
    records = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    epoch = next(r for r in records if r.get('epoch') == 1 and 'train_loss' in r)
    assert np.isfinite(epoch['train_loss']) and 0 <= epoch['val_pgd_acc'] <= epoch['val_clean_acc'] + 1e-9
    model = timm.create_model(TINY_VIT['name'], **TINY_VIT['kwargs'], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'run' / 'model.safetensors')))
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1000)


def test_imagenet_runs_resume_exactly(tmp_path):
    from safetensors.torch import load_file

    from robust_resnets.training.trainer import train
    root = _fake_imagenet(tmp_path / 'in')
    cfg = lambda **run: _imagenet_cfg(root, run={'epochs': 2, **run})  # noqa: E731
    train(cfg(), tmp_path / 'straight')
    assert train(cfg(max_steps=4), tmp_path / 'killed')['status'] == 'stopped'
    train(_imagenet_cfg(root, run={'epochs': 2}, data={'workers': 2}), tmp_path / 'killed', resume=True)
    a = load_file(str(tmp_path / 'straight' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'killed' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imagenet_data_errors_name_the_fix(tmp_path):
    from robust_resnets.training.imagenet_data import load_imagenet_training_data
    root = _fake_imagenet(tmp_path / 'in', classes=1, per_class=1)
    cfg = _imagenet_cfg(root)
    (root / 'train' / 'n99999999').mkdir()
    Image.new('RGB', (8, 8)).save(root / 'train' / 'n99999999' / 'x.png')
    with pytest.raises(ValueError, match='not ImageNet-1k WordNet ids'):
        load_imagenet_training_data(cfg.data, cfg.eval)
    shutil.rmtree(root / 'train' / 'n99999999')
    shutil.rmtree(root / 'val')
    with pytest.raises(FileNotFoundError, match='has no val/<wnid>/ folder; .* --set eval.split=holdout'):
        load_imagenet_training_data(cfg.data, cfg.eval)
    with tarfile.open(tmp_path / 'in.tar', 'w') as tar:
        tar.add(root, arcname='.')
    cfg = _imagenet_cfg(tmp_path / 'in.tar')
    with pytest.raises(ValueError, match='is an archive; .* extract it first'):
        load_imagenet_training_data(cfg.data, cfg.eval)


@pytest.mark.skipif(not (DATA_DIR / 'imagenet-sample-224.tar.gz').is_file(),
                    reason=f'ImageNet sample not found at {DATA_DIR} (see ../shared/data/README.md)')
def test_real_imagenet_sample_through_the_heavy_augmentations(tmp_path):
    from robust_resnets.training.imagenet_data import ImageNetBatches, load_imagenet_training_data
    with tarfile.open(DATA_DIR / 'imagenet-sample-224.tar.gz') as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:64]
        tar.extractall(tmp_path / 'in', members=members, filter='data')
    shutil.copytree(tmp_path / 'in' / 'val', tmp_path / 'in' / 'train')
    cfg = _imagenet_cfg(tmp_path / 'in', data={'image_size': 64, 'workers': 2, 'root': str(tmp_path / 'in')})
    data = load_imagenet_training_data(cfg.data, cfg.eval)
    plan = BatchPlan(n_train=data.n_train, n_generated=0, batch_size=16, generated_fraction=0.0, seed=0,
                     crop_padding=0, flip=False, rotation=0)
    (x, y), = list(ImageNetBatches(data, cfg.data, plan=plan, start=0, stop=1))
    assert x.shape == (16, 3, 64, 64) and y.shape == (16,) and len(set(y.tolist())) > 1
    assert data.eval_images.shape == (8, 3, 64, 64)


def test_randaugment_posterize_takes_zero_bits_like_the_pillow_the_recipes_used():
    # timm's 'inc1' posterize keeps 0 bits at the top magnitude; Pillow >= 10 refuses that, older Pillow
    # returned a black image, and a 224 px Singh et al. batch of 1,920 images hit it here once
    from PIL import ImageOps
    from timm.data.auto_augment import RandAugment

    from robust_resnets.training.imagenet_data import imagenet_train_transform, posterize_keeping_any_bits
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert np.asarray(posterize_keeping_any_bits(img, 0)).max() == 0
    assert np.array_equal(np.asarray(posterize_keeping_any_bits(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    assert posterize_keeping_any_bits(img, 8) is img
    transform = imagenet_train_transform(load_config('singh2023_vit_s').data)
    ops = [op for t in transform.transforms if isinstance(t, RandAugment) for op in t.ops]
    posterize = [op for op in ops if 'Posterize' in op.name]
    assert posterize and all(op.aug_fn is posterize_keeping_any_bits for op in posterize)
    for op in posterize:  # the top magnitude, where 0 bits are asked for
        op.magnitude, op.magnitude_std, op.prob = 10, 0, 1.0
        assert np.asarray(op(img)).max() == 0
