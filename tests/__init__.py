"""The test suite: tiny random models of every family (`tiny.py`), real runtimes, no mocks of them."""
