"""Speed paths, each checked against a readable reference elsewhere: the pair tree (shared prompt scored once) and
the heap allocator setting for CPU training."""
