"""``python -m benchmarks BENCHMARK [args]``: run one benchmark module's ``main``."""
import importlib
import sys

#: name -> (module, what it measures)
BENCHMARKS = {
    'complexity': ('benchmarks.complexity', "papers' #P/#F tables, measured vs printed (CPU, seconds)"),
    'accuracy': ('benchmarks.accuracy', "papers' accuracy columns, evaluated where weights exist (GPU)"),
    'speed': ('benchmarks.speed', 'training/inference speed and bf16 precision checks (GPU)'),
}


def _usage() -> str:
    lines = ['usage: python -m benchmarks {' + ','.join(BENCHMARKS) + '} [args]   (BENCHMARK --help for its options)']
    lines += [f'  {name:12s} {what}' for name, (_, what) in BENCHMARKS.items()]
    lines.append('The papers\' tables and their ids: python -m benchmarks complexity --list')
    return '\n'.join(lines)


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] in ('-h', '--help'):
        print(_usage())
        return 0
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[sys.argv[1]][0])
    return module.main(sys.argv[2:])


if __name__ == '__main__':
    sys.exit(main())
