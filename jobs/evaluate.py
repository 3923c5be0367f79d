"""Ray job entrypoint: nncift `evaluate` (usage: ray job submit -- python -m jobs.evaluate --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("evaluate"))
