"""Ray job entrypoint: nncift `select` (usage: ray job submit -- python -m jobs.select --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("select"))
