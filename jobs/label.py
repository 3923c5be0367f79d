"""Ray job entrypoint: nncift `label` (usage: ray job submit -- python -m jobs.label --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("label"))
