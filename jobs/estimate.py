"""Ray job entrypoint: nncift `estimate` (usage: ray job submit -- python -m jobs.estimate --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("estimate"))
