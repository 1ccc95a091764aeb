"""Stage `download`: sources (https, s3, hf, files) -> raw jsonl.zst shards + quarantine ledger.

`stage.py` is the Prefect-free logic, `task.py` the Prefect task; helpers: `fetch` (transfers),
`sources` (listing), `readers` (record formats)."""
