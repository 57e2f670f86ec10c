import sys

from taichu.cli import main

sys.exit(main())
