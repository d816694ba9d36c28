"""``python -m gapjax.cam``: the command line of ``gapjax.cam.cli``."""

from gapjax.cam.cli import main

if __name__ == "__main__":
    main()
