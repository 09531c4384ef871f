"""`python -m bench` (what `make bench` runs): see bench/serving/run.py and `--help`."""

from bench.serving.run import main

raise SystemExit(main())
