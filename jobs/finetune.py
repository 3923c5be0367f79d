"""Ray job entrypoint: nncift `finetune` (usage: ray job submit -- python -m jobs.finetune --config jobs/configs/demo.yaml)."""

import sys

from jobs._entry import main

if __name__ == "__main__":
    sys.exit(main("finetune"))
