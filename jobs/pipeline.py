"""Ray job entrypoint: nncift `run` (usage: ray job submit -- python -m jobs.pipeline --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("run"))
