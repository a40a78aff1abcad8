"""The numba kernels of treeidx, and only those.

Every module here compiles with numba (`cache=True`) over flat arrays and imports
nothing from treeidx outside this package: the Python side (tree.py, sampling.py,
_build.py) prepares arrays, launches kernels through `_threads.run_parallel`, and
reads the results. docs/architecture.md maps which file owns what.

Records: the tree is one `TreeArrays` (arrays.py), and per-query work arrays are small
NamedTuples of arrays, which numba passes as cheaply as the arrays themselves. One
rule with them: the body of a `prange` loop never writes through a record's field
(`out.ids[b] = ...`, also not in an inlined callee): numba's parallel lowering drops
such stores silently (numba issues #5872, #7135, #10338). Bind the array to a local
before the loop, or write inside a non-inlined function. tests/test_architecture.py
checks the direct form.
"""
