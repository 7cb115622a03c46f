"""``python -m benchmarks BENCHMARK [args]``: run one benchmark module's ``main``."""
import importlib
import sys

BENCHMARKS = {
    'complexity': 'benchmarks.complexity',  # papers' #P/#F tables, measured vs printed (CPU, seconds)
    'accuracy': 'benchmarks.accuracy',      # papers' accuracy columns, evaluated where weights exist (GPU)
    'speed': 'benchmarks.speed',            # training/inference speed and bf16 precision checks (GPU)
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print('usage: python -m benchmarks {' + ','.join(BENCHMARKS) + '} [args]', file=sys.stderr)
        for name, module in BENCHMARKS.items():
            print(f'  {name:12s} {module}', file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[sys.argv[1]])
    return module.main(sys.argv[2:])


if __name__ == '__main__':
    sys.exit(main())
