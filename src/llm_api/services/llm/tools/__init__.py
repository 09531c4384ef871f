"""Tool calls on local models: prompt format (prompt.py), call grammars and the `auto` trigger
(grammar.py), the incremental parser (parser.py) and the backends' glue (local.py)."""
