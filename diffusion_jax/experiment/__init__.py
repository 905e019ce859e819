"""The only readers of a ConfigDict: config -> run, the train step and loop, the modes of main.py.

Imported by main.py, tests and benchmarks only.
"""
