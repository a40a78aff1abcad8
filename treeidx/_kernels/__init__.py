"""The numba kernels of treeidx, and only those.

Every module here compiles with numba (`cache=True`) over flat arrays and imports
nothing from treeidx outside this package: the Python side (tree.py, sampling.py,
_build.py) prepares arrays, launches kernels through `_threads.run_parallel`, and
reads the results. docs/architecture.md maps which file owns what.
"""
