"""``python -m nbllm.server``: the same server as ``nbllm serve``, without the console script."""

import sys

from nbllm.server.running import main

if __name__ == "__main__":
    sys.exit(main())
