"""Speed paths, each held equal to a readable reference by its tests, and chosen by one setting passed in.

- :mod:`~dpolab.fast.paths`: :class:`~dpolab.fast.paths.FastPaths`, the setting (all on by default), and which
  paths a given model allows;
- :mod:`~dpolab.fast.label_logprob`: log softmax(z)[y] in chunks with a recomputing backward;
- :mod:`~dpolab.fast.output_layer`: the output layer only at the scored positions, fused or the model's own;
- :mod:`~dpolab.fast.embedding`: a tied input embedding looked up with a sparse gradient;
- :mod:`~dpolab.fast.pairtree`: each pair as one tree-masked row, the shared prompt once;
- :mod:`~dpolab.fast.allocator`: the heap allocator setting for CPU training.

The readable path they speed up is :mod:`dpolab.logprobs`.
"""
