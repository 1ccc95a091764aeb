"""The `neo` command line (`main.py`) and the local stack it manages (`stack.py`), with their
helpers: process control (`procs.py`), retention (`gc.py`), embedded runtime settings
(`runtime.py`) and notifications (`notify.py`)."""
