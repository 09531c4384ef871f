"""`python -m bench` (what `make bench` runs): see bench/serving/run.py and `--help`.
`python -m bench gateway [...]` runs the gateway-overhead benchmark (bench/gateway.py)."""

import sys

if sys.argv[1:2] == ["gateway"]:
    from bench.gateway import main as gateway

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    gateway()
    raise SystemExit(0)

from bench.serving.run import main  # noqa: E402 - after the dispatch above

raise SystemExit(main())
