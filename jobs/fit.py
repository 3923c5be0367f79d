"""Ray job entrypoint: nncift `fit` (usage: ray job submit -- python -m jobs.fit --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("fit"))
