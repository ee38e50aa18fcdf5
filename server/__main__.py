"""``halluguard-serve``: see :mod:`server.cli`."""

from vllm_halluguard.server.cli import main

if __name__ == "__main__":
    main()
