"""Stage `clean`: raw shards -> Parquet documents + rejection ledger.

`stage.py` is the Prefect-free logic, `task.py` the Prefect task; `shard.py` the per-shard unit,
`filters.py` the repair and quality rules."""
