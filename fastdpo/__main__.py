"""``python -m fastdpo``: the ``fastdpo`` command (see ``fastdpo.cli``)."""

import sys

from fastdpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
