"""Parts the GPU benchmarks share (``benchmarks/gpu_bench.py`` and the scripts beside it).

* :mod:`gpukit.timing`: synchronised wall-clock and CUDA-event timing, peak memory, the ceilings
  measured in a run (bf16 matrix rate, copy bandwidths) and the cards' datasheet rates;
* :mod:`gpukit.flops`: FLOPs per frame of the LLM prefill and of the vision towers (the roofline);
* :mod:`gpukit.models`: the models the benchmarks build (random weights) and the frames they feed;
* :mod:`gpukit.synthetic`: a benchmark-only backend of random blocks, for stored lengths no ingest
  could fill in a run;
* :mod:`gpukit.ingest`: ingest throughput of the fast path and the reference mode, and a profile of
  one chunk's kernels;
* :mod:`gpukit.report`: the Markdown table of a ``gpu_bench.py`` run.

The scripts import it as a sibling (their folder is on ``sys.path`` when run as
``python benchmarks/<script>.py``).
"""
