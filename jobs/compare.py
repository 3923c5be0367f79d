"""Ray job entrypoint: nncift `compare` (usage: ray job submit -- python -m jobs.compare --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("compare"))
