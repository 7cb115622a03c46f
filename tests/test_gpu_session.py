"""The GPU session runbook (benchmarks/gpu_session.sh): its planning arithmetic, and its cheapest stages run end to
end on the CPU in smoke mode (tiny models, no installs)."""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_session

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / 'shared' / 'data'
TINY = {'depths': [1, 1, 1], 'widths': [1, 1, 1]}


def _plan(**kw):
    args = dict(alone={'a': 1000.0, 'b': 500.0}, together={'a': 600.0, 'b': 400.0}, n_train=48976, batch_size=256,
                spe=191, budget_s=900.0, overhead_s=60.0, max_epochs=30)
    return gpu_session.make_plan(**{**args, **kw})


def test_plan_picks_the_faster_way_and_the_epochs_that_fit():
    images = 191 * 256
    plan = _plan()
    # one after the other: 48.9 + 97.8 s an epoch; together: the slower of 81.5 and 122.2 s
    assert plan['sequential_epoch_s'] == pytest.approx(images / 1000 + images / 500)
    assert plan['concurrent_epoch_s'] == pytest.approx(images / 400)
    assert plan['mode'] == 'concurrent' and plan['epochs'] == (900 - 60) // (images / 400)
    assert plan['total_steps'] == plan['epochs'] * 191
    slow_together = _plan(together={'a': 300.0, 'b': 200.0})
    assert slow_together['mode'] == 'sequential'
    assert slow_together['epochs'] == int((900 - 60) // (images / 1000 + images / 500))
    forced = _plan(mode='sequential')
    assert forced['mode'] == 'sequential' and 'sequential was asked for' in forced['why']


def test_plan_caps_and_floors_the_epochs():
    assert _plan(alone={'a': 1e6, 'b': 1e6}, together={'a': 1e6, 'b': 1e6})['epochs'] == 30
    tiny_budget = _plan(budget_s=10.0)
    assert tiny_budget['epochs'] == 1 and tiny_budget['epochs_that_fit'] == 0
    with pytest.raises(ValueError, match='different models'):
        _plan(together={'a': 1.0})
    with pytest.raises(ValueError, match="mode must be"):
        _plan(mode='parallel')


def test_max_steps_counts_from_the_last_checkpoint(tmp_path):
    run = tmp_path / 'run'
    assert gpu_session.max_steps(run_dir=run, img_s=1000.0, seconds=100.0, batch_size=250, total_steps=10_000) == 360
    run.mkdir()
    torch.save({'step': 500}, run / 'last.pt')
    assert gpu_session.max_steps(run_dir=run, img_s=1000.0, seconds=100.0, batch_size=250, total_steps=10_000) == 860
    assert gpu_session.max_steps(run_dir=run, img_s=1000.0, seconds=100.0, batch_size=250, total_steps=600) == 600
    assert gpu_session.max_steps(run_dir=run, img_s=1000.0, seconds=0.0, batch_size=250, total_steps=600) == 501
    assert gpu_session.max_steps(run_dir=run, img_s=1000.0, seconds=100.0, batch_size=250, total_steps=10_000,
                                 cap=5) == 505


def test_best_model_reads_the_worst_case_accuracy(tmp_path):
    for name, acc in (('robust_resnet_a0', 0.41), ('wrn_22_5', 0.43)):
        (tmp_path / f'{name}.json').write_text(json.dumps({'model': {'name': name}, 'robust_accuracy': acc}))
    assert gpu_session.best_model(sorted(tmp_path.glob('*.json'))) == 'wrn_22_5'
    (tmp_path / 'clean.json').write_text(json.dumps({'model': {'name': 'x'}, 'robust_accuracy': None}))
    with pytest.raises(ValueError, match='no worst-case robust accuracy'):
        gpu_session.best_model([tmp_path / 'clean.json'])


def test_eval_builds_a_trained_run_from_its_config_json(tmp_path):
    """A run's export (model.safetensors + config.json with model_args) loads under its registered name."""
    import timm
    from safetensors.torch import save_file

    import robust_resnets  # noqa: F401
    from robust_resnets.evaluation.sources import load_model
    torch.manual_seed(0)
    model = timm.create_model('wrn_22_5', **TINY)
    save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))
    (tmp_path / 'config.json').write_text(json.dumps(
        {'architecture': 'wrn_22_5', 'model_args': {**TINY, 'num_classes': 10}}))
    loaded = load_model('wrn_22_5', dataset='cifar10', checkpoint=tmp_path / 'model.safetensors')
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'wrn_28_10', 'model_args': TINY}))
    with pytest.raises(ValueError, match=r"holds weights for 'wrn_28_10' \(says .*config.json\), not 'wrn_22_5'; "
                                         r"evaluate it with: robust-resnets eval wrn_28_10 --checkpoint"):
        load_model('wrn_22_5', dataset='cifar10', checkpoint=tmp_path / 'model.safetensors')


def test_eval_loads_the_ema_of_a_training_state_by_key(tmp_path):
    """A trainer's last.pt holds the trained weights and their EMA: eval asks which one (--key) and loads it."""
    import timm

    import robust_resnets  # noqa: F401
    from robust_resnets.cli import main
    from robust_resnets.evaluation.sources import load_model
    torch.manual_seed(0)
    trained, ema = timm.create_model('wrn_22_5', **TINY), timm.create_model('wrn_22_5', **TINY)
    torch.save({'state_dict': trained.state_dict(), 'state_dict_ema': ema.state_dict(), 'epoch': 3},
               tmp_path / 'last.pt')
    (tmp_path / 'config.json').write_text(json.dumps({'architecture': 'wrn_22_5', 'model_args': TINY}))
    x = torch.rand(2, 3, 32, 32)
    for key, expected in (('state_dict_ema', ema), ('state_dict', trained)):
        loaded = load_model('wrn_22_5', dataset='cifar10', checkpoint=tmp_path / 'last.pt', checkpoint_key=key)
        with torch.no_grad():
            assert torch.equal(loaded(x), expected.eval()(x))
    with pytest.raises(ValueError, match="no state dict under 'ema'"):
        load_model('wrn_22_5', dataset='cifar10', checkpoint=tmp_path / 'last.pt', checkpoint_key='ema')
    assert main(['eval', 'wrn_22_5', '--key', 'state_dict_ema', '--random-init']) == 1  # --key without --checkpoint


@pytest.mark.skipif(not (DATA / 'cifar10-jpeg.tar.gz').is_file(), reason='no ../shared/data/cifar10-jpeg.tar.gz')
@pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None, reason='needs bash and timeout')
def test_smoke_setup_speed_collect(tmp_path):
    runs, out = tmp_path / 'runs', tmp_path / 'out'
    env = {**os.environ, 'GPU_SESSION_SMOKE': '1', 'GPU_SESSION_RUNS': str(runs), 'OUT': str(out),
           'PYTHON': sys.executable, 'GPU_SESSION_DATA': str(DATA / 'cifar10-jpeg.tar.gz')}
    proc = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_session.sh'), 'setup', 'speed'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = runs / 'results'
    setup = json.loads((results / 'setup.json').read_text())
    assert setup['environment']['torch'] == torch.__version__ and setup['environment']['versions']['timm']
    assert setup['environment']['command'] == 'benchmarks/gpu_session.sh setup'
    assert setup['data_train']['images'] == 50000 and setup['data_test']['images'] == 10000
    matmul = json.loads((results / 'speed_matmul.json').read_text())
    assert matmul['bf16_matmul_tflops'] > 0 and matmul['size'] == 256 and matmul['environment']['device'] == 'cpu'
    train = json.loads((results / 'speed_train_preact_resnet.json').read_text())
    assert [(r['model'], r['batch_size']) for r in train['rows']] == [('preact_resnet', 4)]
    assert train['bf16_matmul_tflops'] == pytest.approx(matmul['bf16_matmul_tflops'], rel=1e-6)
    throughput = json.loads((results / 'speed_throughput_cifar.json').read_text())
    assert throughput['rows'][0]['fp32_img_s'] > 0
    # published beside, and packed into OUT with the logs
    assert {p.name for p in (runs / 'published').glob('*.json')} >= {'setup.json', 'speed_matmul.json'}
    with tarfile.open(out / 'results.tar.gz') as tar:
        names = tar.getnames()
    assert 'results/setup.json' in names and 'results/speed_throughput_cifar.json' in names
    assert not list(out.glob('models.tar.gz.part-*'))  # nothing trained
    assert any(line.startswith('bf16 matmul') for line in proc.stdout.splitlines()[-6:])  # the summary comes last
    # re-running skips what is done
    again = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_session.sh'), 'speed'], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and 'speed_matmul.json: done' in again.stdout


def test_unknown_stage_is_refused():
    proc = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_session.sh'), 'nope'], cwd=REPO,
                          env={**os.environ, 'GPU_SESSION_SMOKE': '1'}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "unknown stage 'nope'" in proc.stderr


def test_a_failed_stage_still_collects(tmp_path):
    """A stage that dies (here: no data) still packs what the call produced into $OUT, and says so."""
    runs, out = tmp_path / 'runs', tmp_path / 'out'
    (runs / 'results').mkdir(parents=True)
    (runs / 'results' / 'speed_matmul.json').write_text('{"bf16_matmul_tflops": 1.0}')
    env = {**os.environ, 'GPU_SESSION_SMOKE': '1', 'GPU_SESSION_RUNS': str(runs), 'OUT': str(out),
           'PYTHON': sys.executable, 'GPU_SESSION_DATA': str(tmp_path / 'missing.tar.gz')}
    proc = subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_session.sh'), 'train'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and 'no CIFAR-10 archive' in proc.stderr
    assert 'stage train failed (exit 1): collecting what there is' in proc.stdout
    with tarfile.open(out / 'results.tar.gz') as tar:
        assert 'results/speed_matmul.json' in tar.getnames()
