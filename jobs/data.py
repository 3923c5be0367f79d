"""Ray job entrypoint: nncift `data` (usage: ray job submit -- python -m jobs.data --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("data"))
