"""Parts of bench/gpu_suite.py (the one prepared GPU suite): record, pre-flight, rows, user commands, faults."""
