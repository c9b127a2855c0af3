"""``python -m cm_cli …`` is ``cm …``."""

from .main import main

if __name__ == "__main__":
    main()
