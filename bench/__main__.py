"""`python -m bench` (what `make bench` runs): see bench/serving/run.py and `--help`.
`python -m bench gateway [...]` runs the gateway-overhead benchmark (bench/gateway.py);
`python -m bench neighbour [...]` what a busy neighbour process costs local inference;
`python -m bench noisy-neighbour [...]` what a flooding tenant costs another tenant's TTFT, FIFO
against fair queuing (bench/noisy_neighbour.py);
`python -m bench embeddings [...]` embedding throughput against llama-server
(bench/embeddings.py);
`python -m bench finetune [...]` fine-tuning training tokens per second (bench/finetune.py)."""

import sys

if sys.argv[1:2] == ["gateway"]:
    from bench.gateway import main as gateway

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    gateway()
    raise SystemExit(0)
if sys.argv[1:2] == ["embeddings"]:
    from bench.embeddings import main as embeddings

    raise SystemExit(embeddings(sys.argv[2:]))
if sys.argv[1:2] == ["noisy-neighbour"]:
    from bench.noisy_neighbour import main as noisy_neighbour

    raise SystemExit(noisy_neighbour(sys.argv[2:]))
if sys.argv[1:2] == ["finetune"]:
    from bench.finetune import main as finetune

    raise SystemExit(finetune(sys.argv[2:]))
if sys.argv[1:2] == ["neighbour"]:
    from bench.neighbour import main as neighbour

    raise SystemExit(neighbour(sys.argv[2:]))

from bench.serving.run import main  # noqa: E402 - after the dispatch above

raise SystemExit(main())
