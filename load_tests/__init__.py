"""Locust load tests for the dsv4 Triton server, their scenarios and the report.

Run from the repository root::

    python -m load_tests.run --scenario short_chat --host grpc://127.0.0.1:8001 --users 1,4,8 --out runs/short
    python -m load_tests.report runs/short/*.jsonl --out runs/short/report
"""
