"""fastkd's benchmark harness: `python -m bench` (see bench/README.md).

shapes: the loss cases, model-pair heads and sweeps. methods: fastkd and its peers behind one
adapter signature. harness: timing, memory, float64 checks, the run loop. report: JSON, markdown,
plots.
"""
