"""The test suite (a package, so test files share tests/_helpers.py)."""
