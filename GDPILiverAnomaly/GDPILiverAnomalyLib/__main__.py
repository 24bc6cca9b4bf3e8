import sys

from .running.stdio import ensure_std_streams

ensure_std_streams()  # a closed stderr (2>&-): before any file takes descriptor 2

from .running.signals import install  # noqa: E402

install()  # before torch is imported: a signal during start-up is handled too

from .running.cli import main  # noqa: E402

sys.exit(main())
