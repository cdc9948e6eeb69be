"""Coverage-guided fuzz harnesses (atheris) for every parser an adversary feeds.

`python -m tests.fuzz --list` names them; `python -m tests.fuzz NAME --minutes N`
runs one; tests/fuzz/test_fuzz.py runs each briefly as part of the test suite.
See harness.py for the invariants and registry.py for the list.
"""
