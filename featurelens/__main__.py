import sys

from featurelens.cli import main

sys.exit(main())
