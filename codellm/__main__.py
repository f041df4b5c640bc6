import sys

from codellm.cli import main

sys.exit(main())
