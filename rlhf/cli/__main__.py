import sys

from speechrl.rlhf.cli.main import main

sys.exit(main())
