"""Stage `tokenize`: documents -> tokenizer.json + packed token rows in Parquet.

`stage.py` is the Prefect-free logic, `task.py` the Prefect task; `bpe.py` (tokenizer), `packing.py`
(rows and splits), `rows.py` (reading the token layout, used by train, evaluate and register)."""
