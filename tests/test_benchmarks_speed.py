"""The GPU speed benchmarks' plumbing, on the CPU with tiny models (the figures themselves need a GPU)."""
import json

import pytest
import torch

from _training_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures('one_thread')
TINY = {'depths': [1, 1, 1], 'widths': [1, 1, 1]}
CPU = torch.device('cpu')


def test_plain_trades_step_trains_and_stays_in_budget(monkeypatch):
    import timm

    import robust_resnets  # noqa: F401
    from benchmarks import speed
    torch.manual_seed(0)
    model = timm.create_model('preact_resnet', **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    seen = []
    real_kl = speed.F.kl_div
    monkeypatch.setattr(speed.F, 'kl_div', lambda inp, tgt, **kw: seen.append(kw['reduction']) or real_kl(inp, tgt, **kw))
    loss = speed.plain_trades_step(model, opt, x, y, steps=3)
    assert seen == ['sum'] * 3 + ['batchmean'] and loss > 0 and model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_speed_row_on_cpu():
    from benchmarks.speed import training_speed
    row = training_speed('preact_resnet', device=CPU, batch_size=4, steps=2, warmup=1, compile=False,
                         peak_tflops=1.0, model_kwargs=TINY)
    assert row['plain_fp32_img_s'] > 0 and row['ours_img_s'] > 0
    assert row['speedup'] == pytest.approx(row['ours_img_s'] / row['plain_fp32_img_s'])
    # fraction of the peak: images/s x MACs x 2 x 3 x 11 FLOPs over 1 TFLOP/s
    assert row['ours_fraction_of_bf16_peak'] == pytest.approx(row['ours_img_s'] * row['macs'] * 66 / 1e12)


def test_throughput_and_precision_on_cpu(tmp_path):
    import timm

    from benchmarks import speed
    row = speed.inference_throughput('preact_resnet', device=CPU, batch_size=2, warmup=1, iters=2, model_kwargs=TINY)
    assert row['input_size'] == [3, 32, 32] and row['fp32_img_s'] > 0 and row['bf16_cl_img_s'] > 0
    torch.manual_seed(0)
    model = timm.create_model('preact_resnet', **TINY).eval()
    images, labels = torch.rand(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = speed.precision_check(model, images, labels, eps=8 / 255, device=CPU, attacks='clean,pgd2')
    assert set(out['fp32']) == set(out['bf16_channels_last']) == {'clean', 'pgd2'}
    assert out['difference']['clean'] == pytest.approx(out['bf16_channels_last']['clean'] - out['fp32']['clean'])
    # the wrapper computes the same function up to bf16 rounding
    wrapped = speed.Bf16ChannelsLast(timm.create_model('preact_resnet', **TINY).eval())
    wrapped.model.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, fast = model(images), wrapped(images)
    assert fast.dtype == torch.float32 and (fast - ref).norm() / ref.norm() < 3e-2


def test_command_line_writes_its_environment(tmp_path):
    from benchmarks import speed
    out = tmp_path / 'throughput.json'
    assert speed.main(['throughput', '--device', 'cpu', '--models', 'preact_resnet', '--batch-size', '2',
                       '--warmup', '0', '--iters', '1', '--model-kwargs', json.dumps(TINY), '--out', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload['environment']['device'] == 'cpu' and payload['environment']['torch'] == torch.__version__
    assert [r['model'] for r in payload['rows']] == ['preact_resnet']
    with pytest.raises(SystemExit, match='matches no registered model'):
        speed.main(['throughput', '--device', 'cpu', '--models', 'nope*'])


@pytest.mark.skipif(__import__('importlib').util.find_spec('robustbench') is None,
                    reason='robustbench is not installed (optional extra: pip install robust-resnets[robustbench])')
def test_autoattack_ours_against_robustbench_on_cpu(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from benchmarks import speed
    monkeypatch.setenv('ROBUST_RESNETS_CACHE', str(tmp_path / 'cache'))
    rng = np.random.default_rng(0)
    for c in ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'):
        (tmp_path / 'cifar' / 'test' / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / 'cifar' / 'test' / c / '0.png')
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    out = speed.autoattack_speed(model, data_dir=str(tmp_path / 'cifar'), n_examples=10, device=CPU, batch_size=10,
                                 robustbench_batch_size=10)
    assert out['ours']['seconds'] > 0 and out['robustbench']['seconds'] > 0
    # the same images and the same attacks: the same clean accuracy, and AutoAttack agrees on this model
    assert out['ours']['clean'] == pytest.approx(out['robustbench']['clean'])
    assert out['ours']['autoattack'] == pytest.approx(out['robustbench']['autoattack'])
