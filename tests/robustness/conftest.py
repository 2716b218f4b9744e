import os
from pathlib import Path


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("SFTKIT_WRITE_ROBUSTNESS_DOC"):
        from .test_bad_inputs import RESULTS, write_doc

        if RESULTS:
            write_doc(Path(__file__).resolve().parents[2] / "docs" / "robustness.md")
