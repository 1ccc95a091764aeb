"""Stage `dedup`: clean documents -> exact and near duplicates removed + duplicates ledger.

`stage.py` is the Prefect-free logic (global step), `task.py` the Prefect task; `shard.py` the
per-shard units, `minhash.py` the hashing."""
