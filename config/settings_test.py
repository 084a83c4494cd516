"""Settings for the test suite: production settings plus a throwaway secret key."""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key")

from config.settings import *  # noqa: E402, F403
