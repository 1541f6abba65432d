"""wsgate's load benchmark: ``make bench`` / ``make bench-quick`` (see docs/performance.md).

Modules:

* :mod:`benchmarks.run` - the orchestrator and its command line (``python -m benchmarks.run``);
* :mod:`benchmarks.loadgen` - the load generator's worker processes (picows clients);
* :mod:`benchmarks.backend` - the echo backend (picows server);
* :mod:`benchmarks.targets` - what is measured: direct, wsgate, trio-naive, nginx, websockets-relay;
* :mod:`benchmarks.trio_naive` and :mod:`benchmarks.ws_relay` - the two baseline relays;
* :mod:`benchmarks.stats` - figures and the markdown report (pure functions, unit-tested);
* :mod:`benchmarks.charts` - PNG charts (matplotlib);
* :mod:`benchmarks.procs` - child processes and /proc accounting.
"""
