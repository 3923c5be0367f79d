"""Ray job entrypoint: nncift `report` (usage: ray job submit -- python -m jobs.report --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("report"))
