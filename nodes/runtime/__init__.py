"""The node process: wiring (`node.py`), the local executor (`executor.py`), operators' commands (`admin.py`),
configuration (`config.py`), the memory budget, systemd notifications and logs."""
