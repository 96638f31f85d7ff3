"""diffbench's harness.  ``from bench_core import evaluate`` benchmarks your own denoiser (bench_core.api)."""


def __getattr__(name):  # lazy: `import bench_core` stays light for the CLI
    if name in ("evaluate", "Results"):
        from . import api  # noqa: PLC0415 - lazy: keeps the CLI start fast (api imports torch)

        return getattr(api, name)
    raise AttributeError(f"module 'bench_core' has no attribute {name!r}")
