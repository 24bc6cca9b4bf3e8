import sys

from .signals import install

install()  # before torch is imported: a signal during start-up is handled too

from .cli import main  # noqa: E402

sys.exit(main())
