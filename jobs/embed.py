"""Ray job entrypoint: nncift `embed` (usage: ray job submit -- python -m jobs.embed --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("embed"))
