# A package, so that tests/gpu/conftest.py is imported as `gpu.conftest` and does not take the
# place of tests/conftest.py, which the test modules import as `conftest`.
